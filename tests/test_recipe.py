"""The recipe's levers, worked by hand: balanced sampling, the lesion-pooled head, the class gating the mask,
calibration (ECE, temperature), the weighted F1 of training's confusion counts, and the recipe table."""

import numpy as np
import pandas as pd
import pytest
import torch

from busi.config import EvaluateParams
from busi.data.arrays import SegmentationDataset
from busi.evaluation.metrics import case_table, ece_by_chance, expected_calibration_error, summary
from busi.evaluation.postprocessing import decide, fit_temperature
from busi.model.network import LesionHead, build_model
from busi.model.postprocessing import PostProcessing
from busi.training import SegmentationLoss, f1_weighted, image_dice_loss, loader
from conftest import tiny_params


def probabilities_table(labels: list[str], probabilities: list[list[float]]) -> pd.DataFrame:
    p = np.array(probabilities)  # columns: normal, benign, malignant
    return pd.DataFrame({"label": labels, "p_normal": p[:, 0], "p_benign": p[:, 1], "p_malignant": p[:, 2]})


def test_expected_calibration_error_by_hand():
    # Bins of width 0.1 on the top probability. Images 1-2: 0.95 and 0.95 (bin 9), one right one wrong:
    # |0.95 - 0.5| * 2/4 = 0.225. Images 3-4: 0.6 (bin 6), both right: |0.6 - 1| * 2/4 = 0.2. ECE 0.425.
    cases = probabilities_table(["normal", "benign", "benign", "malignant"],
                                [[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]])
    assert expected_calibration_error(cases) == pytest.approx(0.425)
    perfect = probabilities_table(["benign", "malignant"], [[0, 1, 0], [0, 0, 1]])
    assert expected_calibration_error(perfect) == 0


def test_ece_by_chance_by_hand():
    # Labels drawn from the probabilities themselves. Certain probabilities: the label is the top class every
    # draw, ECE 0. One image at (0.5, 0.5, 0): right or wrong, its one bin is 0.5 off, ECE 0.5 every draw.
    assert (ece_by_chance(np.array([[1.0, 0, 0], [0, 0, 1.0]]), draws=50) == 0).all()
    assert np.allclose(ece_by_chance(np.array([[0.5, 0.5, 0]]), draws=50), 0.5)
    # Two images at (0.5, 0.5, 0): both right or both wrong (half the draws) 0.5, one of each 0; and a
    # third class of probability 0 is never drawn.
    draws = ece_by_chance(np.array([[0.5, 0.5, 0], [0.5, 0.5, 0]]), draws=4000)
    assert set(np.round(draws, 9)) == {0.0, 0.5} and abs(draws.mean() - 0.25) < 0.03


def test_the_temperature_fitted_softens_overconfident_probabilities():
    # Always 0.9 sure, right 60% of the time: the likelihood is best where the top class gets 0.6, i.e.
    # 0.9^(1/T) / (0.9^(1/T) + 2 * 0.05^(1/T)) = 0.6  ->  (18)^(1/T) = 3  ->  T = ln 18 / ln 3 = 2.63.
    labels = np.array([1] * 6 + [0] * 2 + [2] * 2)
    probabilities = np.tile([0.05, 0.9, 0.05], (10, 1))
    temperature = fit_temperature(labels, probabilities)
    assert temperature == pytest.approx(np.log(18) / np.log(3), rel=0.02)
    calibrated = PostProcessing(temperature=temperature).calibrate(probabilities)
    assert calibrated[0, 1] == pytest.approx(0.6, abs=0.01) and calibrated.sum(1) == pytest.approx(1)
    assert (calibrated.argmax(1) == probabilities.argmax(1)).all()  # labels unchanged


def test_the_class_gates_the_mask():
    probabilities = np.full((3, 4, 4), 0.9, np.float32)  # a lesion everywhere on the first two
    probabilities[2] = 0.05
    probabilities[2, 0, 0], probabilities[2, 3, 3], probabilities[2, 3, 2] = 0.3, 0.2, 0.16  # nothing above 0.5
    heads = np.array([[0.1, 0.2, 0.7], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])  # CLASSES: benign, malignant, normal
    sizes = np.array([[4, 4]] * 3)
    masks, labels, _ = PostProcessing(mask_from_label=True).apply(probabilities, heads, sizes)
    assert list(labels) == [2, 0, 1] and not masks[0].any() and masks[1].all()
    # Malignant, but no pixel reached 0.5: the largest region at half the highest probability (>= 0.15) is drawn,
    # the two-pixel one at the corner (3,2)-(3,3), not the single brighter pixel at (0,0).
    assert np.argwhere(masks[2]).tolist() == [[3, 2], [3, 3]]
    masks, _, _ = PostProcessing().apply(probabilities, heads, sizes)
    assert masks[0].all() and not masks[2].any()  # off: the mask is the mask


def test_gating_is_decided_on_every_image_of_validation():
    # Two images: a normal one with a lesion drawn (the head says normal), a benign one whose lesion is found (the
    # head says benign). Gating empties the normal image's mask: per-image Dice over both rises from 0.5 to 1.
    lesion = np.zeros((2, 4, 4), bool)
    lesion[1, 1:3, 1:3] = True
    val = {"ids": np.array(["n", "b"]), "labels": np.array([2, 0]), "sizes": np.array([[4, 4], [4, 4]])}
    probabilities = np.stack([np.where(lesion[1], 0.9, 0.1)] * 2).astype(np.float32)
    heads = np.array([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    params = EvaluateParams(threshold=0.5, postprocessing={"mask_from_label": "auto"}, calibration="off", bootstrap=0,
                            seed=0, figure_cases=1)
    chosen, record = decide(lambda flip: (probabilities, heads), val, [lesion[0], lesion[1]], params)
    assert chosen.mask_from_label
    assert record == {"mask_from_label": {"off": 0.5, "on": 1.0}}


def test_weighted_f1_of_a_confusion_matrix_by_hand():
    # actual x predicted. Class 0: tp 2, 3 actual, 2 predicted: F1 = 4/5. Class 1: tp 1, 1 actual, 2 predicted:
    # 2/3. Class 2: none actual, none predicted: 0 (weight 0). Weighted: (3 * 0.8 + 1 * 2/3) / 4 = 0.7667.
    confusion = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert f1_weighted(confusion) == pytest.approx((3 * 0.8 + 2 / 3) / 4)


def test_the_dice_per_lesion_image_by_hand():
    # Three 1x4 images. A: logits 0 (probability 0.5 everywhere) on the lesion [1, 1, 0, 0]: overlap 1, sizes 2 + 2,
    # Dice 0.5. B: no lesion, probability 0.5 everywhere: no Dice of its own. C: a one-pixel lesion found exactly.
    big = 30.0
    logits = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [big, -big, -big, -big]]).reshape(3, 1, 1, 4)
    masks = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).reshape(3, 1, 1, 4)
    assert image_dice_loss(logits, masks).item() == pytest.approx((0.5 + 0.0) / 2)  # B left out
    # Pooled over the batch, B's stray probability and A's half overlap weigh against C's exact find:
    # overlap 1 + 1, sizes (2 + 2) + (2 + 0) + (1 + 1): Dice 4 / 8.
    pooled = SegmentationLoss(torch.ones(3), 0.0).dice(logits, masks)
    assert pooled.item() == pytest.approx(0.5, abs=1e-4)
    # A batch without a lesion has no Dice term, and still a gradient graph (BCE goes on).
    empty = image_dice_loss(logits[1:2].requires_grad_(), masks[1:2])
    assert empty.item() == 0.0 and empty.requires_grad
    per_image = SegmentationLoss(torch.ones(3), 0.0, per_image=True)
    assert per_image(logits, torch.zeros(3, 3), masks, torch.zeros(3, dtype=torch.long)).item() == pytest.approx(
        0.25 + torch.nn.functional.binary_cross_entropy_with_logits(logits, masks).item(), abs=1e-4)


def test_deep_supervision_scores_the_coarse_logits_by_hand():
    # One 4x4 image, its lesion the top-left 2x2 block. The full-size logits are 0 (probability 0.5 everywhere):
    # BCE ln 2; Dice overlap 0.5 * 4 = 2, sizes 8 + 4, so 1 - 4/12 = 2/3. The 2x2 coarse logits find the mask
    # averaged down to [[1, 0], [0, 0]] exactly (+-30): Dice and BCE about 0. Weights 1 and 1/2, summing to 1.
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    full, coarse = torch.zeros(1, 1, 4, 4), torch.tensor([[30.0, -30], [-30, -30]]).reshape(1, 1, 2, 2)
    loss = SegmentationLoss(torch.ones(3), 0.0, per_image=True)
    args = torch.zeros(1, 3), mask, torch.zeros(1, dtype=torch.long)
    assert loss(full, *args).item() == pytest.approx(2 / 3 + np.log(2), abs=1e-5)
    assert loss(full, *args, [coarse]).item() == pytest.approx((2 / 3 + np.log(2)) / 1.5, abs=1e-5)
    # Coarse logits that miss add their own loss at half weight: 0 everywhere at 2x2 scores as the full size does.
    assert loss(full, *args, [torch.zeros(1, 1, 2, 2)]).item() == pytest.approx(2 / 3 + np.log(2), abs=1e-5)


def test_balanced_sampling_draws_each_class_alike():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    arrays = {"images": np.zeros((100, 8, 8), np.uint8), "masks": np.zeros((100, 8, 8), np.uint8), "labels": labels}
    drawn = torch.cat([batch[2] for batch in loader(SegmentationDataset(arrays), 50, torch.device("cpu"), 0,
                                                    shuffle=True, balanced=True)])
    assert len(drawn) == 100  # an epoch is as long as before
    counts = np.bincount(drawn.numpy(), minlength=3)
    assert counts.min() > 20, counts  # uniform draws would give about 90 / 9 / 1


def test_the_lesion_head_reads_the_features_under_the_lesion():
    head = LesionHead(channels=1, classes=1, dropout=0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[0.0, 1.0]]))  # only the lesion-pooled feature
        head.linear.bias.zero_()
    feature = torch.zeros(1, 1, 2, 2)
    feature[0, 0, 0, 0] = 8.0  # the feature is high in one quarter
    lesion_there = torch.full((1, 1, 4, 4), -20.0)
    lesion_there[..., :2, :2] = 20.0  # the lesion covers that quarter
    lesion_elsewhere = torch.full((1, 1, 4, 4), -20.0)
    lesion_elsewhere[..., 2:, 2:] = 20.0
    assert head([feature], lesion_there).item() == pytest.approx(8.0, rel=1e-3)
    assert head([feature], lesion_elsewhere).item() == pytest.approx(0.0, abs=1e-3)


def test_the_lesion_head_model_trains_and_reloads():
    params = tiny_params()
    model = build_model(params.model.model_copy(update={"class_head": "lesion"}))
    mask_logits, class_logits = model(torch.rand(2, 1, 64, 64))
    assert mask_logits.shape == (2, 1, 64, 64) and class_logits.shape == (2, 3)
    again = build_model(params.model.model_copy(update={"class_head": "lesion"}))
    again.load_state_dict(model.state_dict())  # the configuration rebuilds it


def test_recipe_summary_has_calibration_and_every_image_dice():
    references = [np.zeros((2, 2), bool), np.ones((2, 2), bool)]
    predictions = [np.zeros((2, 2), bool), np.ones((2, 2), bool)]
    cases = case_table(["n", "b"], [2, 0], [2, 0], predictions, references, np.array([[0, 0, 1.0], [1.0, 0, 0]]))
    metrics = summary(cases, cases[["p_benign", "p_malignant", "p_normal"]].to_numpy())
    assert metrics["dice_per_image_all"] == 1.0 and metrics["ece"] == 0.0
