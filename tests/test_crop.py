"""The crop network: the crop it is cut from, how its say is weighed against the class head's, the decision on
validation, and the predictor that carries it (hand-worked values; its training on synthetic images runs in
tests/test_evaluate.py's end-to-end test)."""

import json
import math

import numpy as np
import pytest
import torch

from busi import CLASSES, BusiError, autocast_dtype
from busi.config import CropConfig
from busi.crop_training import train_crop_network
from busi.data.arrays import read_references
from busi.evaluation.postprocessing import decide
from busi.model.crop import CropClassifier, box_of, build_crop_network, cut
from busi.model.postprocessing import PostProcessing, average_with_crop
from busi.model.predictor import Predictor, load_predictor
from conftest import tiny_params, untrained_network
from test_evaluate import head_says, make_split, params, square

GRADIENT = np.arange(40 * 40, dtype=np.uint8).reshape(40, 40) % 251  # every pixel tells where it came from


def test_the_crop_is_the_lesion_box_grown_by_the_margin_at_its_own_scale():
    assert box_of(square(3, 5, side=4)) == (3, 7, 5, 9)
    # Margin 0 at the box's own size: the pixels under the box, as they are.
    np.testing.assert_array_equal(cut(GRADIENT, (10, 30, 10, 30), 20, 0.0), GRADIENT[10:30, 10:30])
    # Margin 0.5 doubles the side (20 -> 40: the whole image), shrunk to 20 px by averaging 2x2 blocks.
    blocks = GRADIENT.astype(float).reshape(20, 2, 20, 2).mean((1, 3))
    np.testing.assert_allclose(cut(GRADIENT, (10, 30, 10, 30), 20, 0.5), blocks, atol=0.5)
    # At the corner, the part outside the image is black: the box (0, 20) grown to 40 starts at -10.
    corner = cut(GRADIENT, (0, 20, 0, 20), 40, 0.5)
    assert not corner[:10].any() and not corner[:, :10].any()
    np.testing.assert_array_equal(corner[10:, 10:], GRADIENT[:30, :30])
    # Shifted by a quarter of its side (10 px) down: the rows below.
    np.testing.assert_array_equal(cut(GRADIENT, (10, 30, 10, 30), 20, 0.0, (0.25, 0.0)), GRADIENT[15:35, 10:30])


def test_the_crop_networks_say_is_averaged_into_the_benign_malignant_split():
    heads = np.array([[0.6, 0.2, 0.2], [0.6, 0.2, 0.2]])  # lesion mass 0.8, of which the head puts 0.25 malignant
    averaged = average_with_crop(heads, np.array([0.9, np.nan]), 0.5)
    # 0.5 x 0.25 + 0.5 x 0.9 = 0.575 of 0.8 is malignant; normal unchanged; no crop (nothing drawn): the head's.
    np.testing.assert_allclose(averaged, [[0.34, 0.46, 0.2], [0.6, 0.2, 0.2]])
    np.testing.assert_allclose(average_with_crop(heads, np.array([0.9, 0.1]), 0.75)[:, 1],
                               [0.8 * (0.25 * 0.25 + 0.75 * 0.9), 0.8 * (0.25 * 0.25 + 0.75 * 0.1)])
    # In the transform the head is calibrated first: temperature 2 makes (0.6, 0.2, 0.2) proportional to their
    # square roots, (0.464, 0.268, 0.268): lesion mass 0.732, malignant share 0.366, averaged with 0.9: 0.633.
    square_lesion = np.zeros((1, 8, 8), np.float32)
    square_lesion[0, 2:6, 2:6] = 1
    _, labels, probabilities = PostProcessing(temperature=2.0, crop_weight=0.5).apply(
        square_lesion, heads[:1], np.array([[8, 8]]), lambda masks: np.array([0.9]))
    np.testing.assert_allclose(probabilities, [[0.26865, 0.46340, 0.26795]], atol=1e-5)
    assert labels[0] == CLASSES.index("malignant")  # the head alone said benign


def test_the_crop_weight_is_decided_on_validation_and_off_without_a_crop_network(tmp_path):
    # The masks are right; the head calls every lesion benign; the crop network tells them apart.
    references = [square(2, 2), square(8, 8), square(2, 8), square(8, 2)]
    val, masks_dir = make_split(tmp_path, references, ["benign", "benign", "malignant", "malignant"])
    references = read_references(masks_dir, val)
    probabilities, head = np.stack(references).astype(np.float32), np.tile([0.6, 0.3, 0.1], (4, 1))
    crops = []

    def crop(masks):
        crops.append(len(masks))
        return np.array([0.1, 0.2, 0.9, 0.8])

    fixed = {"flip_tta": "off", "largest_component": "off", "label_from_mask": "off", "crop_weight": "auto"}
    chosen, record = decide(head_says((probabilities, head)), val, references, params(**fixed), crop)
    # weighted F1 (all benign: 1/3; all right: 1) and malignant AUC (the head's constant: 0.5; with the crop: 1):
    # weight 0.25 leaves the malignant share at 0.75 x 1/3 + 0.25 x 0.9 = 0.475 < 0.5, still benign.
    assert record["crop_weight"] == pytest.approx({"0": (1 / 3 + 0.5) / 2, "0.25": (1 / 3 + 1) / 2, "0.5": 1.0,
                                                   "0.75": 1.0}, abs=1e-6)
    assert chosen.crop_weight == 0.5 and crops  # a tie keeps the smaller weight
    # Without a crop network there is nothing to weigh: off, even where params force it on.
    for setting in ("auto", 0.5):
        chosen, record = decide(head_says((probabilities, head)), val, references,
                                params(**fixed | {"crop_weight": setting}))
        assert chosen.crop_weight == 0.0 and "crop_weight" not in record


def constant_crop_network(malignant: float) -> CropClassifier:
    """A crop network that says `malignant` of every crop."""
    network = build_crop_network()
    with torch.no_grad():
        network.fc.weight.zero_()
        network.fc.bias.copy_(torch.tensor([0.0, math.log(malignant / (1 - malignant))]))
    return CropClassifier([network.eval()], CropConfig(size=32, margin=0.5))


def test_the_predictor_carries_the_crop_network_and_predict_applies_it(tmp_path):
    network, config = untrained_network(32)
    # Threshold 0.01: every image gets a lesion drawn, hence a crop; the crop network says 0.9 malignant.
    postprocessing = PostProcessing(threshold=0.01, crop_weight=0.5)
    predictor = Predictor([network], [config], postprocessing, crop=constant_crop_network(0.9))
    images = [np.random.default_rng(i).integers(0, 255, (50 + 10 * i, 60), dtype=np.uint8) for i in range(3)]
    _, heads = predictor.probabilities(np.stack([predictor.resize(image) for image in images]))
    predictions = predictor.predict(images)
    for prediction, head in zip(predictions, heads, strict=True):
        p = [prediction.probabilities[name] for name in CLASSES]
        assert prediction.mask.any()
        assert p[1] / (p[0] + p[1]) == pytest.approx(0.5 * head[1] / (head[0] + head[1]) + 0.5 * 0.9, abs=1e-5)
        assert p[2] == pytest.approx(head[2], abs=1e-6)  # normal: the head's

    predictor.save(tmp_path / "predictor")
    manifest = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    assert manifest["crop"] == {"weights": ["crop-0.safetensors"], "size": 32, "margin": 0.5}
    loaded = load_predictor(tmp_path / "predictor")
    assert [p.probabilities for p in loaded.predict(images)] == pytest.approx([p.probabilities for p in predictions])
    assert Predictor([network], [config], postprocessing).predict(images)[0].probabilities != \
        predictions[0].probabilities  # without it, the head alone

    # A manifest that anyone may have edited: one line naming what is wrong.
    for crop, message in (({"weights": ["../crop-0.safetensors"], "size": 32, "margin": 0.5}, "outside the predictor"),
                          ({"weights": ["crop-0.safetensors"], "size": 7, "margin": 0.5},
                           "invalid crop network configuration: size"),
                          ({"size": 32, "margin": 0.5}, "missing field 'weights'"),
                          ({"weights": [], "size": 32, "margin": 0.5}, "crop.weights \\[\\] is not a list of weights"),
                          ([1, 2], "not a valid predictor manifest")):
        (tmp_path / "predictor" / "predictor.json").write_text(json.dumps(manifest | {"crop": crop}))
        with pytest.raises(BusiError, match=message):
            load_predictor(tmp_path / "predictor")


def test_the_crop_network_learns_from_lesions_of_both_classes_only():
    images = [GRADIENT] * 3
    references = [square(5, 5, side=10, size=(40, 40))] * 2 + [np.zeros((40, 40), bool)]
    labels = np.array([CLASSES.index(name) for name in ("benign", "benign", "normal")])
    with pytest.raises(BusiError, match="needs benign and malignant lesions.*2 benign and 0 malignant"):
        train_crop_network(images, references, labels, tiny_params().crop)
    labels[1] = CLASSES.index("malignant")
    classifier, summary = train_crop_network(images, references, labels, tiny_params().crop)
    assert summary | {"loss": 0, "minutes": 0} == {"images": 2, "benign": 1, "malignant": 1, "epochs": 1,
                                                   "precision": "fp32", "loss": 0, "minutes": 0}
    assert classifier.config == CropConfig(size=32, margin=0.5)
    shares = classifier.malignant(images, references)
    assert np.isnan(shares[2]) and 0 < shares[0] < 1  # nothing drawn on the normal image: no crop


def test_the_crop_network_trains_in_the_precision_asked_and_keeps_fp32_weights():
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    images = [GRADIENT] * 2
    references = [square(5, 5, side=10, size=(40, 40))] * 2
    labels = np.array([CLASSES.index("benign"), CLASSES.index("malignant")])
    classifier, summary = train_crop_network(images, references, labels,
                                             tiny_params().crop.model_copy(update={"precision": "bf16"}))
    assert summary["precision"] == "bf16"  # autocast: the weights stay fp32, so the checkpoint is the same kind
    assert {tensor.dtype for tensor in classifier.states()[0].values()} <= {torch.float32, torch.int64}
