"""Evaluate: each metric on hand-made masks, post-processing chosen on validation, bootstrap intervals, mapping
back to the original size, and the whole stage on a tiny trained model with a real MLflow store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from busi import CLASSES, BusiError, tracking
from busi.cli import main
from busi.commands.check_metrics import check_metrics
from busi.config import EvaluateParams, NetworkConfig
from busi.data.arrays import read_references
from busi.data.layouts.busi import find_root, scan
from busi.evaluation.figures import cases_figure
from busi.evaluation.metric_files import write_metrics
from busi.evaluation.metrics import (
    METRICS,
    bootstrap_ci,
    classification_metrics,
    keys,
    paired_bootstrap,
    per_class_metrics,
    segmentation_metrics,
)
from busi.evaluation.postprocessing import decide, score
from busi.model.postprocessing import STEPS, PostProcessing
from busi.model.predictor import Predictor
from busi.stages.evaluate import evaluate
from busi.stages.train_crop import train_crop
from busi.training import train
from conftest import PARAMS_FILE, REPO, run_env, tiny_params

CI_METRICS = [metric.key for metric in METRICS if metric.interval]
SIDE = 20  # hand-made images are SIDE x SIDE, predicted at that size too: no resizing in between


def square(top: int, left: int, side: int = 4, size: tuple[int, int] = (SIDE, SIDE)) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[top : top + side, left : left + side] = True
    return mask


EMPTY = np.zeros((SIDE, SIDE), bool)


def make_split(tmp_path, references, labels, images_size: int = SIDE):
    """Reference masks written as data/masks PNGs (0/255) and the arrays load_split would return."""
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"{label} ({i})" for i, label in enumerate(labels)]
    for image_id, reference in zip(ids, references, strict=True):
        cv2.imwrite(str(masks_dir / f"{image_id}.png"), reference.astype(np.uint8) * 255)
    arrays = {"images": np.zeros((len(ids), images_size, images_size), np.uint8), "ids": np.array(ids),
              "labels": np.array([CLASSES.index(label) for label in labels]),
              "sizes": np.array([reference.shape for reference in references]).reshape(-1, 2)}
    return arrays, masks_dir


def score_masks(tmp_path, references, predictions, labels, largest_component=False):
    """The per-image cases of probability maps under the post-processing (uniform class probabilities)."""
    arrays, masks_dir = make_split(tmp_path, references, labels)
    probabilities = np.stack(predictions).astype(np.float32)
    uniform = np.full((len(labels), len(CLASSES)), 1 / 3)
    return score(PostProcessing(largest_component=largest_component), probabilities, uniform, arrays,
                 read_references(masks_dir, arrays))[1]


def head_says(probabilities):
    """probabilities_of for decide: the same maps and class probabilities with or without flip."""
    return lambda flip: probabilities


def params(**changes) -> EvaluateParams:
    """Evaluate params with these changes: a step's name sets it under postprocessing (a step left out is off)."""
    names = {step.name for step in STEPS}
    steps = {"largest_component": "auto", "flip_tta": "auto", "label_from_mask": "auto"}
    steps |= {key: value for key, value in changes.items() if key in names}
    return EvaluateParams(**{"threshold": 0.5, "postprocessing": steps, "bootstrap": 200, "seed": 0,
                             "figure_cases": 1, **{key: v for key, v in changes.items() if key not in names}})


@pytest.mark.parametrize(("reference", "prediction", "dice", "iou"), [
    (square(2, 2), square(2, 2), 1.0, 1.0),  # perfect
    (square(2, 2), square(10, 10), 0.0, 0.0),  # disjoint
    (square(0, 0), square(0, 2), 0.5, 1 / 3),  # half overlap: 8 shared of 16 + 16 pixels
    (square(2, 2), EMPTY, 0.0, 0.0),  # empty prediction
    (EMPTY, square(2, 2), 0.0, 0.0),  # empty reference
    (EMPTY, EMPTY, np.nan, np.nan),  # both empty: no case
])
def test_per_image_dice_and_iou(tmp_path, reference, prediction, dice, iou):
    case = score_masks(tmp_path, [reference], [prediction], ["benign"]).iloc[0]
    np.testing.assert_equal([case.dice, case.iou], [dice, iou])  # NaN equals NaN here
    assert case.lesion_area_px == reference.sum() and case.predicted_area_px == prediction.sum()
    assert case.tp + case.fp + case.fn + case.tn == SIDE * SIDE


def test_pooled_and_per_image_segmentation_metrics(tmp_path):
    cases = score_masks(tmp_path, [square(2, 2), square(2, 2), EMPTY, EMPTY],
                        [square(2, 2), square(10, 10), square(15, 15, side=2), EMPTY],
                        ["benign", "malignant", "normal", "normal"])
    metrics = segmentation_metrics(cases)
    # Pooled: tp 16, fp 16 + 4, fn 16 over 4 x 400 pixels.
    assert metrics["dice"] == pytest.approx(32 / (32 + 20 + 16))
    assert metrics["iou"] == pytest.approx(16 / (16 + 20 + 16))
    assert metrics["pixel_accuracy"] == pytest.approx(1 - 36 / 1600)
    assert metrics["dice_per_image"] == metrics["iou_per_image"] == 0.5  # perfect and disjoint; normals left out
    assert metrics["normal_fp_rate"] == 0.5  # one of two normal images has a predicted lesion
    assert metrics["dice_per_image_all"] == (1 + 0 + 1 + 0) / 4  # an empty prediction of a normal image scores 1

    per_class = {name: segmentation_metrics(cases[cases.label == name]) for name in CLASSES}
    assert per_class["benign"]["dice"] == 1 and per_class["malignant"]["dice"] == 0
    assert "normal_fp_rate" not in per_class["benign"]
    assert set(per_class["normal"]) == {"pixel_accuracy", "normal_fp_rate", "dice_per_image_all"}  # no lesion Dice


def test_an_empty_reference_counts_in_pooled_metrics_but_not_per_image(tmp_path):
    cases = score_masks(tmp_path, [square(2, 2), EMPTY], [square(2, 2), square(10, 10)], ["benign", "benign"])
    metrics = segmentation_metrics(cases)
    assert metrics["dice_per_image"] == 1.0
    assert metrics["dice"] == pytest.approx(32 / (32 + 16))


def test_classification_metrics_and_per_class():
    cases = pd.DataFrame({"label": ["benign", "benign", "malignant", "normal"],
                          "predicted_label": ["benign", "malignant", "malignant", "normal"]})
    probabilities = np.array([[0.9, 0.1, 0.0], [0.45, 0.55, 0.0], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    metrics = classification_metrics(cases, probabilities)
    assert metrics["accuracy"] == 0.75
    assert metrics["f1_weighted"] == pytest.approx((2 * 2 / 3 + 2 / 3 + 1) / 4)
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert metrics["roc_auc_ovr"] == 1.0  # the ranking is perfect even where the argmax is wrong
    assert metrics["confusion"]["benign"] == {"benign": 1, "malignant": 1, "normal": 0}
    assert "roc_auc_ovr" not in classification_metrics(cases[cases.label != "normal"], probabilities[:3])
    # Benign or malignant images only: malignant scores 0.1, 0.55 (benign) vs 0.9 (malignant) rank perfectly;
    # predicted malignant: one benign (FP) and the malignant (TP): F1 = 2 / (2 + 1) = 2/3.
    assert metrics["auc_malignant_vs_benign"] == 1.0
    assert metrics["f1_malignant_vs_benign"] == pytest.approx(2 / 3)

    cases["tp"], cases["fp"], cases["fn"], cases["tn"] = [4, 4, 4, 0], 0, 0, 12
    cases["lesion_area_px"], cases["predicted_area_px"] = [4, 4, 4, 0], [4, 4, 4, 0]
    cases["dice"] = cases["iou"] = [1.0, 1.0, 1.0, np.nan]
    per_class = per_class_metrics(cases)
    assert per_class["benign"]["images"] == 2 and per_class["benign"]["recall"] == 0.5
    assert per_class["malignant"]["precision"] == 0.5 and per_class["normal"]["f1"] == 1.0
    assert per_class["malignant"]["dice"] == 1.0 and per_class["normal"]["normal_fp_rate"] == 0.0


def test_largest_component_drops_the_smaller_blob(tmp_path):
    reference, prediction = square(2, 2, side=6), square(2, 2, side=6) | square(15, 15, side=2)
    without = score_masks(tmp_path, [reference], [prediction], ["benign"]).iloc[0]
    kept = score_masks(tmp_path, [reference], [prediction], ["benign"], largest_component=True).iloc[0]
    assert without.dice == pytest.approx(72 / 76) and without.predicted_area_px == 40
    assert kept.dice == 1.0 and kept.predicted_area_px == 36


def test_auto_keeps_the_largest_component_only_where_it_helps_on_validation(tmp_path):
    fixed = {"flip_tta": "off", "label_from_mask": "off"}
    arrays, masks_dir = make_split(tmp_path / "a", [square(2, 2, side=6)], ["benign"])
    helps = head_says((np.stack([square(2, 2, side=6) | square(15, 15, side=2)]).astype(np.float32),
                       np.array([[0.6, 0.3, 0.1]])))
    references = read_references(masks_dir, arrays)
    chosen, record = decide(helps, arrays, references, params(**fixed))
    assert chosen.largest_component is True
    assert record == {"largest_component": {"on": 1.0, "off": pytest.approx(72 / 76)}}
    assert decide(helps, arrays, references, params(**fixed, largest_component="off"))[0].largest_component is False

    two_lesions = square(2, 2, side=6) | square(14, 14, side=4)
    arrays, masks_dir = make_split(tmp_path / "b", [two_lesions], ["malignant"])
    hurts = head_says((np.stack([two_lesions]).astype(np.float32), np.array([[0.3, 0.6, 0.1]])))
    references = read_references(masks_dir, arrays)
    chosen, record = decide(hurts, arrays, references, params(**fixed))
    assert chosen.largest_component is False
    assert record["largest_component"]["on"] < record["largest_component"]["off"] == 1
    assert decide(hurts, arrays, references, params(**fixed, largest_component="on"))[0].largest_component is True


def test_min_lesion_area_drops_the_regions_under_its_fraction_of_the_image():
    # A 20x20 image (400 px): a 6x6 lesion (36 px = 9%) and a 2x2 speck (4 px = 1%).
    probability = (square(2, 2, side=6, size=(20, 20)) | square(15, 15, side=2, size=(20, 20))).astype(np.float32)
    assert PostProcessing(min_lesion_area=0.01).mask(probability, 20, 20).sum() == 40  # 4 >= 0.01 * 400: kept
    assert PostProcessing(min_lesion_area=0.011).mask(probability, 20, 20).sum() == 36  # the speck goes
    assert PostProcessing(min_lesion_area=0.1).mask(probability, 20, 20).sum() == 0  # 36 < 40: both go
    kept = PostProcessing(min_lesion_area=0.011, largest_component=True).mask(probability, 20, 20)
    assert kept.sum() == 36


def test_auto_chooses_the_min_lesion_area_that_empties_the_normal_images_on_validation(tmp_path):
    # A normal image with a one-pixel false lesion and a benign one whose 6x6 lesion is found.
    references = [EMPTY, square(2, 2, side=6)]
    arrays, masks_dir = make_split(tmp_path, references, ["normal", "benign"])
    predicted = np.stack([square(10, 10, side=1), square(2, 2, side=6)]).astype(np.float32)
    heads = np.array([[0.2, 0.1, 0.7], [0.7, 0.2, 0.1]])
    references = read_references(masks_dir, arrays)
    fixed = {"flip_tta": "off", "largest_component": "off", "label_from_mask": "off", "min_lesion_area": "auto"}
    chosen, record = decide(head_says((predicted, heads)), arrays, references, params(**fixed))
    # Per-image Dice over both images: 0.5 while the speck stays (the normal image scores 0), 1 once it goes; the
    # lesion (36 px) goes too from 36 / SIDE**2 on. The smallest value that drops the speck wins.
    speck, lesion = 1 / SIDE**2, 36 / SIDE**2
    expected = {f"{v:g}": 1.0 if speck < v <= lesion else 0.5 if v <= speck else 0.0 for v in STEPS[1].values}
    assert record["min_lesion_area"] == expected
    assert chosen.min_lesion_area == min(v for v in STEPS[1].values if speck < v <= lesion)
    off = decide(head_says((predicted, heads)), arrays, references, params(**fixed | {"min_lesion_area": "off"}))
    assert off[0].min_lesion_area == 0 and "min_lesion_area" not in off[1]


def test_predictions_are_scored_at_the_original_size(tmp_path):
    height, width = 190, 310
    reference = np.zeros((height, width), bool)
    reference[:, : width // 2] = True  # left half
    arrays, masks_dir = make_split(tmp_path, [reference], ["benign"], images_size=64)
    probability = np.full((1, 64, 64), 0.1, np.float32)
    probability[:, :, :32] = 0.9  # left half, at 64 px
    uniform = np.full((1, 3), 1 / 3)
    case = score(PostProcessing(), probability, uniform, arrays, read_references(masks_dir, arrays))[1].iloc[0]
    assert case.tp + case.fp + case.fn + case.tn == height * width
    assert case.lesion_area_px == height * width // 2
    assert case.dice > 0.99

    cv2.imwrite(str(masks_dir / "benign (0).png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(BusiError, match=r"benign \(0\)\.png: mask is 64x64, the image was 190x310"):
        read_references(masks_dir, arrays)
    (masks_dir / "benign (0).png").unlink()
    with pytest.raises(BusiError, match=r"benign \(0\)\.png: reference mask missing"):
        read_references(masks_dir, arrays)


def test_bootstrap_interval_holds_the_estimate_and_is_seeded(tmp_path):
    rng = np.random.default_rng(0)
    references = [square(int(rng.integers(0, 10)), int(rng.integers(0, 10)), side=6) for _ in range(30)]
    predictions = [np.roll(reference, int(rng.integers(0, 5)), axis=1) for reference in references]
    cases = score_masks(tmp_path, references, predictions, ["benign"] * 15 + ["malignant"] * 15)
    cases["predicted_label"] = rng.choice(["benign", "malignant"], 30)
    probabilities = rng.dirichlet(np.ones(3), 30)
    cases[["p_benign", "p_malignant", "p_normal"]] = probabilities
    point = segmentation_metrics(cases) | classification_metrics(cases, probabilities)
    ci = bootstrap_ci(cases, 200, seed=1)
    assert set(ci) == set(CI_METRICS)
    for name in CI_METRICS:
        assert ci[name]["low"] < point[name] < ci[name]["high"], name
    assert bootstrap_ci(cases, 200, seed=1) == ci
    assert bootstrap_ci(cases, 200, seed=2) != ci
    assert bootstrap_ci(cases, 0, seed=1) == {}


def test_contour_figure_shows_the_best_and_worst_case_per_class(tmp_path):
    references = [square(2, 2), square(2, 2), square(2, 2), EMPTY, EMPTY]
    predictions = [square(2, 4), square(2, 2), square(12, 12), square(15, 15, side=3), square(15, 15, side=1)]
    labels = ["benign", "benign", "benign", "normal", "normal"]
    arrays, masks_dir = make_split(tmp_path, references, labels)
    refs = read_references(masks_dir, arrays)
    _, cases, preds = score(PostProcessing(), np.stack(predictions).astype(np.float32), np.full((5, 3), 1 / 3),
                            arrays, refs)
    figure = cases_figure(cases, arrays, refs, preds, count=1)
    titles = [[ax.get_title().split("\n")[0] for ax in figure.axes[row * 2 : row * 2 + 2]] for row in range(2)]
    assert titles == [["benign (1)", "benign (2)"], ["normal (4)", "normal (3)"]]  # a row per class present
    assert len(figure.axes) == 4


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment writes MLFLOW_EXPERIMENT_ID into os.environ: register it so that it is removed after.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    return mlflow.MlflowClient(uri)


def test_evaluate_end_to_end_adds_to_the_training_run(processed, synthetic_source, tmp_path, store, monkeypatch,
                                                     capsys):
    run_params = tiny_params(epochs=1)
    run_params = run_params.model_copy(update={"evaluate": params(bootstrap=50, crop_weight="auto")})
    (tmp_path / "params.yaml").write_text(json.dumps(run_params.model_dump(mode="json")))
    summary = train(processed, run_params, tmp_path / "models", tmp_path / "train.json", tmp_path / "history.csv")
    masks_dir = processed.parent / "masks"
    crop = train_crop(synthetic_source, masks_dir, processed.parent / "splits.csv", run_params, tmp_path / "crop.pt",
                      tmp_path / "crop.json")
    assert crop["epochs"] == 1 and crop["images"] == crop["benign"] + crop["malignant"] > 0
    chosen_on = []  # the split post-processing is chosen on

    def spy(probabilities_of, arrays, *args):
        chosen_on.append(list(arrays["ids"]))
        return decide(probabilities_of, arrays, *args)

    monkeypatch.setattr("busi.evaluation.postprocessing.decide", spy)
    args = ["--data", str(processed), "--raw", str(synthetic_source), "--masks", str(masks_dir),
            "--model", str(tmp_path / "models"), "--crop", str(tmp_path / "crop.pt"),
            "--train-metrics", str(tmp_path / "train.json"), "--history", str(tmp_path / "history.csv"),
            "--out", str(tmp_path / "test.json"), "--val-out", str(tmp_path / "val.json"),
            "--plots", str(tmp_path / "plots"), "--figures", str(tmp_path / "figures"),
            "--predictor", str(tmp_path / "predictor")]
    assert main(["--params", str(tmp_path / "params.yaml"), "evaluate", *args]) == 0
    out = capsys.readouterr().out
    assert "evaluate: test dice" in out and "post-processing threshold 0.5, flip tta" in out
    assert "decided on validation: flip_tta, largest_component, crop_weight, label_from_mask" in out

    val, test = np.load(processed / "val.npz"), np.load(processed / "test.npz")
    assert chosen_on == [list(val["ids"])]
    headline = {"images", "iou", "dice", "pixel_accuracy", "dice_per_image", "normal_fp_rate", "f1_weighted",
                "accuracy", "auc_malignant_vs_benign", "ece", "ece_by_chance"}  # METRICS' top-level keys
    metrics = json.loads((tmp_path / "test_detail.json").read_text())
    assert headline | {"iou_per_image", "dice_per_image_all", "f1_macro", "roc_auc_ovr", "f1_malignant_vs_benign",
                       "confusion", "per_class", "ci95", "postprocessing"} == set(metrics)
    # The DVC metrics file holds the headline only: what `dvc metrics show` and `dvc exp show` tabulate.
    assert json.loads((tmp_path / "test.json").read_text()) == {key: metrics[key] for key in headline}
    assert metrics["images"] == len(test["ids"]) == sum(sum(row.values()) for row in metrics["confusion"].values())
    assert set(metrics["per_class"]) == set(CLASSES) and "dice" in metrics["per_class"]["malignant"]
    assert set(metrics["ci95"]) == set(CI_METRICS) and set(metrics["ci95"]["dice"]) == {"low", "high"}
    steps = {"threshold", "temperature", *(step.name for step in STEPS)}
    assert set(metrics["postprocessing"]) == steps | {"decisions"}
    assert {"flip_tta", "largest_component", "label_from_mask"} <= set(metrics["postprocessing"]["decisions"])
    assert set(json.loads((tmp_path / "val.json").read_text())) == headline
    val_metrics = json.loads((tmp_path / "val_detail.json").read_text())  # what runs are compared on
    assert val_metrics["images"] == len(val["ids"]) and set(val_metrics["per_class"]) == set(CLASSES)
    assert {"dice", "iou", "dice_per_image", "f1_weighted", "accuracy"} <= set(val_metrics)

    # The predictor carries the network and what was chosen on validation.
    manifest = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    assert manifest["postprocessing"] == {key: metrics["postprocessing"][key] for key in steps}
    assert manifest["image_size"] == 64 and manifest["networks"][0]["model"]["encoder"] == "resnet18"
    assert manifest["provenance"]["mlflow_run_id"] == summary["run_id"]
    assert manifest["crop"] == {"weights": ["crop-0.safetensors"], "size": 32, "margin": 0.5}  # the crop network
    assert "crop_weight" in metrics["postprocessing"]["decisions"]  # decided on validation, with the network there

    per_image = pd.read_csv(tmp_path / "plots/per_image.csv")
    assert list(per_image.columns) == ["image_id", "group", "label", "predicted_label", "dice", "iou",
                                       "lesion_area_px", "predicted_area_px", "tp", "fp", "fn", "tn", "p_benign",
                                       "p_malignant", "p_normal"]
    assert list(per_image.image_id) == list(test["ids"])
    assert list(per_image.group) == list(test["groups"])  # each image's scan: the bootstrap draws them whole
    for row in per_image.itertuples():  # reference areas counted at the original resolution
        original = cv2.imread(str(masks_dir / f"{row.image_id}.png"), cv2.IMREAD_GRAYSCALE)
        assert row.lesion_area_px == np.count_nonzero(original)
    confusion = pd.read_csv(tmp_path / "plots/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert list(confusion.actual) == list(per_image.label) and set(confusion.predicted) <= set(CLASSES)
    for name in ["figure1_loss_iou.png", "figure2_contours.png"]:
        assert cv2.imread(str(tmp_path / "figures" / name)) is not None, name

    # One model, one answer: predict with no flags on the test images' files gives evaluate's masks and labels.
    paths = {case.image_id: case.image for case in scan(find_root(synthetic_source))}
    result = subprocess.run([sys.executable, "-m", "busi", "predict", *(str(paths[i]) for i in per_image.image_id),
                             "--out", str(tmp_path / "predicted")], cwd=tmp_path, env=run_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "predict: threshold 0.5, flip tta" in result.stderr and "(from predictor)" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "predicted" / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == list(per_image.predicted_label)
    # predict runs one image per forward pass, evaluate a batch: the convolutions' float rounding differs in the
    # last bits, which can move a pixel whose probability sits on the threshold.
    assert [r["lesion_area_px"] for r in records] == pytest.approx(list(per_image.predicted_area_px), abs=2)

    run = store.get_run(summary["run_id"])  # the training's own run
    assert run.data.metrics["test/dice"] == pytest.approx(metrics["dice"])
    assert run.data.metrics["test_ci95/dice_low"] == pytest.approx(metrics["ci95"]["dice"]["low"])
    per_class = metrics["per_class"]
    assert run.data.metrics["test_detail/per_class.malignant.dice"] == pytest.approx(per_class["malignant"]["dice"])
    assert run.data.metrics["test_detail/per_class.benign.iou"] == pytest.approx(per_class["benign"]["iou"])
    assert "val/dice" in run.data.metrics and run.info.status == "FINISHED"
    # Every metric sits in a section of the run page (the part before "/"): the curves, the evaluation's.
    sections = {name.split("/")[0] for name in run.data.metrics}
    assert sections == {"train", "val", "test", "test_ci95", "test_detail", "val_eval", "val_eval_detail"}
    artifacts = {artifact.path for artifact in store.list_artifacts(run.info.run_id)}
    assert {"test_metrics.json", "test_per_image.json", "figure1_loss_iou.png", "figure2_contours.png"} <= artifacts
    assert run.data.tags["busi.model_uri"].startswith("models:/")

    def classes_in_table(download_to):
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_metrics.json",
                                                   dst_path=str(download_to), tracking_uri=store.tracking_uri)
        table = json.loads(Path(path).read_text())  # log_table's layout: {"columns": [...], "data": [[...], ...]}
        return [row[table["columns"].index("class")] for row in table["data"]]

    assert classes_in_table(tmp_path / "download") == ["all", *CLASSES]
    mlflow.start_run(run_id=run.info.run_id)  # evaluated again: the tables are replaced, not appended to
    tracking.log_table(run.info.run_id, pd.DataFrame([{"class": "all"}, *({"class": c} for c in CLASSES)]),
                       "test_metrics.json")
    mlflow.end_run()
    assert classes_in_table(tmp_path / "again") == ["all", *CLASSES]

    # Errors: one line naming the file; nothing written.
    outputs = (run_params.evaluate, tmp_path / "t.json", tmp_path / "p", tmp_path / "f", tmp_path / "v.json",
               tmp_path / "pred")
    partial = tmp_path / "partial"
    shutil.copytree(processed, partial)
    (partial / "test.npz").unlink()
    raw, crop = synthetic_source, tmp_path / "crop.pt"
    with pytest.raises(BusiError, match="test.npz"):
        evaluate(partial, raw, masks_dir, tmp_path / "models", crop, tmp_path / "train.json", tmp_path / "history.csv",
                 *outputs)
    with pytest.raises(BusiError, match="nowhere: model folder not found"):
        evaluate(processed, raw, masks_dir, tmp_path / "nowhere", crop, tmp_path / "train.json",
                 tmp_path / "history.csv", *outputs)
    with pytest.raises(BusiError, match="missing.json: no training run id"):
        evaluate(processed, raw, masks_dir, tmp_path / "models", crop, tmp_path / "missing.json",
                 tmp_path / "history.csv", *outputs)
    (tmp_path / "other.json").write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(BusiError, match=f"other.json: MLflow run {'0' * 32} is not in the tracking store"):
        evaluate(processed, raw, masks_dir, tmp_path / "models", crop, tmp_path / "other.json",
                 tmp_path / "history.csv", *outputs)
    with pytest.raises(BusiError, match="nocrop.pt: no such crop network"):
        evaluate(processed, raw, masks_dir, tmp_path / "models", tmp_path / "nocrop.pt", tmp_path / "train.json",
                 tmp_path / "history.csv", *outputs)
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "pred").exists()


class LeftHalf(torch.nn.Module):
    """A 'model' that sees only the left half of the image: mirroring changes its answer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        left = torch.zeros_like(x)
        left[..., : x.shape[-1] // 2] = x[..., : x.shape[-1] // 2]
        class_logits = torch.stack([left.mean((1, 2, 3)), x.mean((1, 2, 3)), torch.zeros(len(x))], 1)
        return (left * 20 - 1) * self.weight, class_logits


def left_half_predictor(networks: int = 1) -> Predictor:
    config = NetworkConfig.model_validate({"model": tiny_params().model.model_dump(), "image_size": 32})
    return Predictor([LeftHalf() for _ in range(networks)], [config] * networks)


def test_flip_tta_averages_with_the_mirrored_prediction():
    images = np.zeros((1, 8, 8), np.uint8)
    images[0, :, :4] = 255  # bright on the left
    predictor = left_half_predictor()
    plain, plain_classes = predictor.probabilities(images, flip=False)
    averaged, averaged_classes = predictor.probabilities(images, flip=True)
    mirrored, mirrored_classes = predictor.probabilities(images[:, :, ::-1].copy(), flip=False)
    np.testing.assert_allclose(averaged, (plain + mirrored[:, :, ::-1]) / 2, atol=1e-6)
    np.testing.assert_allclose(averaged_classes, (plain_classes + mirrored_classes) / 2, atol=1e-6)
    assert not np.allclose(averaged, plain)
    # An ensemble of identical networks averages to the same probabilities.
    ensemble, ensemble_classes = left_half_predictor(networks=3).probabilities(images, flip=True)
    np.testing.assert_allclose(ensemble, averaged, atol=1e-6)
    np.testing.assert_allclose(ensemble_classes, averaged_classes, atol=1e-6)


def test_flip_tta_is_forced_or_decided_on_validation(tmp_path):
    val, masks_dir = make_split(tmp_path, [square(0, 0, side=8, size=(8, 8))] * 2, ["benign", "malignant"],
                                images_size=8)
    val["images"][:] = 255
    references = read_references(masks_dir, val)
    predictor = left_half_predictor()

    def probabilities_of(flip):
        return predictor.probabilities(val["images"], flip=flip)

    fixed = {"largest_component": "off", "label_from_mask": "off"}
    assert decide(probabilities_of, val, references, params(flip_tta="on", **fixed))[0] == PostProcessing(flip_tta=True)
    assert decide(probabilities_of, val, references, params(flip_tta="off", **fixed))[0].flip_tta is False
    chosen, record = decide(probabilities_of, val, references, params(**fixed))
    # The lesion fills the image: the plain prediction finds its left half, the average all of it.
    assert chosen.flip_tta is True and record["flip_tta"]["on"] > record["flip_tta"]["off"]


def test_labels_from_the_mask_follow_the_predicted_lesion():
    probabilities = np.array([[0.2, 0.1, 0.7], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])  # benign, malignant, normal
    area = np.array([40, 0, 0])
    assert list(PostProcessing(label_from_mask=False).labels(probabilities, area)) == [2, 0, 2]  # the head's
    assert list(PostProcessing(label_from_mask=True).labels(probabilities, area)) == [0, 2, 2]  # lesion: benign


def test_label_from_mask_is_forced_or_decided_on_validation(tmp_path):
    # The head calls every image benign; the masks find the lesion images and leave the normal one empty.
    references = [square(2, 2), square(8, 8), EMPTY]
    val, masks_dir = make_split(tmp_path, references, ["benign", "malignant", "normal"])
    references = read_references(masks_dir, val)
    probabilities = np.stack(references).astype(np.float32)
    head = np.array([[0.5, 0.4, 0.1], [0.4, 0.35, 0.25], [0.6, 0.1, 0.3]], np.float32)
    fixed = {"flip_tta": "off", "largest_component": "off"}
    chosen, record = decide(head_says((probabilities, head)), val, references, params(**fixed))
    assert chosen.label_from_mask is True
    assert record["label_from_mask"]["on"] > record["label_from_mask"]["off"]
    off, record = decide(head_says((probabilities, head)), val, references, params(**fixed, label_from_mask="off"))
    assert off.label_from_mask is False and "label_from_mask" not in record
    # Where the head is right and the masks miss the lesions, auto keeps the head.
    right = np.eye(3, dtype=np.float32)
    missed = np.zeros_like(probabilities)
    assert decide(head_says((missed, right)), val, references, params(**fixed))[0].label_from_mask is False


def test_a_new_metric_is_one_entry_of_metrics(tmp_path, extra_metric):
    references = [square(2, 2), square(8, 8), EMPTY, EMPTY]
    arrays, masks_dir = make_split(tmp_path, references, ["benign", "malignant", "normal", "normal"])
    predicted = np.stack([square(2, 2), EMPTY, square(4, 4), EMPTY]).astype(np.float32)  # lesions drawn on 2 of 4
    heads = np.tile([0.6, 0.3, 0.1], (4, 1))
    metrics, cases, _ = score(PostProcessing(), predicted, heads, arrays, read_references(masks_dir, arrays))
    assert metrics["lesions_drawn"] == 0.5  # in every split's metrics, so in the metrics files
    assert set(bootstrap_ci(cases, 50, 0)["lesions_drawn"]) == {"low", "high"}
    assert paired_bootstrap(cases, cases, 20, 0)["lesions_drawn"]["difference"] == 0
    assert "lesions_drawn" in keys("fold")  # a cross-validation's mean ± sd
    write_metrics(tmp_path / "test.json", metrics)
    assert json.loads((tmp_path / "test.json").read_text())["lesions_drawn"] == 0.5
    write_metrics(tmp_path / "new.json", metrics | {"lesions_drawn": 0.3})  # the CI gate: dropped by 0.2 > 0.1
    assert "lesions_drawn" in check_metrics(tmp_path / "new.json", tmp_path / "test.json")[1]


def test_paired_bootstrap_on_constructed_models(tmp_path):
    """Two models on the same 40 images: identical models differ by exactly nothing; a model that finds every
    lesion beats one that misses half of them, beyond noise, in Dice and F1."""
    references = [square(i % 10, i % 10, side=6) for i in range(40)]
    labels = ["benign", "malignant"] * 20
    good = score_masks(tmp_path / "good", references, references, labels)
    good["predicted_label"] = labels
    half = score_masks(tmp_path / "half", references, [r if i % 2 else EMPTY for i, r in enumerate(references)],
                       labels)
    half["predicted_label"] = [label if i % 2 else "normal" for i, label in enumerate(labels)]
    same = paired_bootstrap(good, good.sample(frac=1, random_state=0), resamples=200, seed=0)  # order is free
    assert np.isnan(same.pop("normal_fp_rate")["difference"])  # no normal image here: undefined
    assert same == {name: {"difference": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}
                    for name in keys("paired") if name != "normal_fp_rate"}
    better = paired_bootstrap(good, half, resamples=500, seed=0)
    assert better["dice"]["difference"] == pytest.approx(1 - 2 * 720 / (2 * 720 + 720))  # pooled: B has tp 720 of 1440
    assert 0 < better["dice"]["low"] < better["dice"]["difference"] < better["dice"]["high"]
    assert better["dice"]["p"] < 0.01 and better["f1_weighted"]["p"] < 0.01
    worse = paired_bootstrap(half, good, resamples=500, seed=0)
    assert worse["dice"]["difference"] == -better["dice"]["difference"] and worse["dice"]["high"] < 0
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(good, half.iloc[:-1], resamples=10, seed=0)


def test_paired_bootstrap_of_the_malignant_auc(tmp_path):
    """The malignant AUC is paired too: on 20 benign and 20 malignant images, a head that gives every malignant
    image a higher malignant probability than every benign one (AUC 1) against one that does the opposite (AUC 0):
    a difference of exactly +1 in every draw that holds both classes, p 0."""
    references = [square(i % 10, i % 10, side=6) for i in range(40)]
    labels = ["benign", "malignant"] * 20
    right = score_masks(tmp_path / "right", references, references, labels)
    malignant = np.array(labels) == "malignant"
    wrong = right.copy()
    right["p_malignant"], wrong["p_malignant"] = np.where(malignant, 0.6, 0.2), np.where(malignant, 0.2, 0.6)
    right["p_benign"], wrong["p_benign"] = 0.9 - right["p_malignant"], 0.9 - wrong["p_malignant"]
    auc = paired_bootstrap(right, wrong, resamples=200, seed=0)["auc_malignant_vs_benign"]
    assert auc == {"difference": 1.0, "low": 1.0, "high": 1.0, "p": 0.0}


def test_paired_bootstrap_draws_whole_scans(tmp_path):
    """Two models that differ on one scan only, filed ten times (ten copies: one group), among 30 scans of one
    image each. Drawn image by image, every resample holds some of the ten copies and the difference looks
    certain; drawn by scan, the scan is left out of about a third of the resamples ((1 - 1/31)^31 = 0.36), so the
    interval reaches zero: one scan is one measurement, however often it is filed."""
    references = [square(i % 10, i % 10, side=6) for i in range(40)]
    labels = ["benign"] * 40
    good = score_masks(tmp_path / "good", references, references, labels)
    misses = score_masks(tmp_path / "misses", references, [EMPTY] * 10 + references[10:], labels)
    assert list(good["group"]) == list(good["image_id"])  # no groups known: each image its own
    by_image = paired_bootstrap(good, misses, resamples=500, seed=0)["dice_per_image"]
    assert by_image["difference"] == pytest.approx(10 / 40) and by_image["low"] > 0 and by_image["p"] < 0.01
    scans = ["scan 0"] * 10 + [f"scan {i}" for i in range(1, 31)]
    good, misses = good.assign(group=scans), misses.assign(group=scans)
    by_scan = paired_bootstrap(good, misses, resamples=500, seed=0)["dice_per_image"]
    assert by_scan["difference"] == by_image["difference"] and by_scan["low"] == 0 and 0.5 < by_scan["p"] < 0.9



FILL_HOLES_FUNCTION = """

def fill_holes(mask, _on):
    import scipy.ndimage
    return scipy.ndimage.binary_fill_holes(mask)
"""
FILL_HOLES_ENTRY = """    Step("fill_holes", "fill the holes of each lesion region", ("dice_per_image",), "mask",
         fill_holes),
"""

NEW_STEP_CHECKS = r"""
import json, sys
from pathlib import Path
import cv2, numpy as np
from busi import BusiError
from busi.cli import check_tables
from busi.commands.ablate import ablation_rows
from busi.config import load_params
from busi.data.arrays import read_references
from busi.evaluation.postprocessing import decide
from busi.model.postprocessing import PostProcessing, step_settings
from busi.tracking import flatten

work, committed = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
ring = np.zeros((12, 12), np.float32)
ring[2:10, 2:10] = 1
ring[4:8, 4:8] = 0  # an 8 x 8 lesion with a 4 x 4 hole: 48 pixels, 64 filled
cv2.imwrite(str(work / "benign (0).png"), np.pad(np.full((8, 8), 255, np.uint8), 2))  # the lesion: no hole
val = {"images": np.zeros((1, 12, 12), np.uint8), "ids": np.array(["benign (0)"]), "labels": np.array([0]),
       "sizes": np.array([[12, 12]])}
head = np.array([[0.8, 0.1, 0.1]], np.float32)
only_it = load_params(sys.argv[2]).evaluate.model_copy(update={"postprocessing": {"fill_holes": "auto"}})
chosen, record = decide(lambda flip: (ring[None], head), val, read_references(work, val), only_it)
seen = {"settings": [step_settings({"fill_holes": "on"})["fill_holes"], step_settings({})["fill_holes"]],
        "pixels": [int(PostProcessing(fill_holes=v).mask(ring, 12, 12).sum()) for v in (False, True)],
        "decided": [chosen.fill_holes, record["fill_holes"]],
        "ablation": ablation_rows()[-1]}
for value in ("on", "maybe"):
    setting = f"  postprocessing:\n    fill_holes: {value}"
    (work / "params.yaml").write_text(committed.replace("  postprocessing:", setting))
    try:
        params = load_params(work / "params.yaml")
        check_tables(Path("params.yaml"), params)
        seen[value] = flatten(params.model_dump(mode="json"))["evaluate.postprocessing.fill_holes"]
    except BusiError as err:
        seen[value] = str(err)
print(json.dumps(seen))
"""


def test_a_new_postprocessing_step_is_one_entry_of_steps(tmp_path):
    """A copy of the library whose one change is an entry of STEPS (and its function) in
    busi/model/postprocessing.py: the step is a field of the transform, a params key checked like the others (and
    logged to MLflow, where the report's recipe table shows it as a lever), a `busi predict` flag, decided on
    validation by its criterion, and a row of `busi ablate`."""
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    module = tmp_path / "src" / "busi" / "model" / "postprocessing.py"
    text = module.read_text()
    steps_end = text.index("\n)\n", text.index("\nSTEPS = ")) + 1  # the tuple's closing parenthesis
    text = text[:steps_end] + FILL_HOLES_ENTRY + text[steps_end:]
    function_at = text.index("\n\n@dataclass(frozen=True)\nclass Step")
    module.write_text(text[:function_at] + FILL_HOLES_FUNCTION + text[function_at:])
    (tmp_path / "work").mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    done = subprocess.run([sys.executable, "-c", NEW_STEP_CHECKS, str(tmp_path / "work"), str(PARAMS_FILE)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["settings"] == [True, False]  # on; left out: off
    assert seen["pixels"] == [48, 64]  # the ring, then filled
    assert seen["decided"] == [True, {"off": round(2 * 48 / (48 + 64), 6), "on": 1.0}]  # the ring's Dice: 0.857
    assert seen["ablation"] == ["+ fill_holes on", {"fill_holes": True}]
    assert seen["on"] is True  # YAML on; logged to MLflow as evaluate.postprocessing.fill_holes
    assert seen["maybe"] == "params.yaml: evaluate.postprocessing.fill_holes: 'maybe' is not auto, on, off"
    usage = subprocess.run([sys.executable, "-m", "busi", "predict", "--help"], env=env, capture_output=True,
                           text=True).stdout
    assert "--fill-holes" in usage and "fill the holes of each lesion region" in usage
