"""Cross-validation on synthetic data: every fold trained as an MLflow child of one parent run, the
post-processing decided on the out-of-fold predictions, the fold ensemble one predictor scored on test."""

import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from busi import BusiError
from busi.commands.report import report
from busi.config import load_grid
from busi.data.arrays import load_split
from busi.model.crop import load_crop_checkpoint
from busi.model.predictor import Predictor, load_predictor
from busi.stages.cross_validate import cross_validate
from busi.training import thread_count
from conftest import REPO, tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_every_fold_trains_and_the_ensemble_is_one_predictor(processed, synthetic_source, tmp_path, store):
    splits = processed.parent / "splits.csv"  # 2 folds (conftest)
    params = tiny_params(epochs=1)
    auto = {step: "auto" for step in params.evaluate.postprocessing}  # to decide, not as params.yaml set them
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"bootstrap": 20,
                                                                                       "postprocessing": auto})})
    result = cross_validate(processed, splits, processed.parent / "masks", params, tmp_path / "cv",
                            raw_dir=synthetic_source)

    assert result["folds"] == 2 and set(result["per_fold"]) == {"0", "1"}
    for k in (0, 1):  # a fold keeps its last epoch: the held-out images it validates on never choose it
        assert json.loads((tmp_path / f"cv/folds/fold-{k}/train.json").read_text())["monitor"] == "last"
    for name in ("dice", "f1_weighted"):
        values = [result["per_fold"][fold][name] for fold in ("0", "1")]
        assert result["mean"][name] == pytest.approx(np.mean(values))
        assert result["sd"][name] == pytest.approx(np.std(values, ddof=1))
    written = json.loads((tmp_path / "cv/cv.json").read_text())
    assert written["mean"] == result["mean"] and written["oof"]["images"] == sum(
        len(load_split(processed, s)["labels"]) for s in ("train", "val"))  # every train+val image, once
    test = json.loads((tmp_path / "cv/test.json").read_text())
    assert test["images"] == len(load_split(processed, "test")["labels"]) and "dice" in test["ci95"]
    assert {"flip_tta", "crop_weight", "label_from_mask"} <= set(test["postprocessing"]["decisions"])  # on the OOF

    # The ensemble: both folds' networks, probabilities averaged; what predict and serving load.
    ensemble = load_predictor(tmp_path / "cv/predictor")
    folds = [Predictor.from_checkpoints([tmp_path / f"cv/folds/fold-{k}/best.pt"]) for k in (0, 1)]
    assert len(ensemble.networks) == 2
    images = load_split(processed, "test")["images"][:4]
    masks, classes = ensemble.probabilities(images, flip=False)
    parts = [fold.probabilities(images, flip=False) for fold in folds]
    np.testing.assert_allclose(masks, (parts[0][0] + parts[1][0]) / 2, atol=1e-6)
    np.testing.assert_allclose(classes, (parts[0][1] + parts[1][1]) / 2, atol=1e-6)
    # ... and both folds' crop networks, each trained on its fold's training images, their probabilities averaged.
    crops = [load_crop_checkpoint(tmp_path / f"cv/folds/fold-{k}/crop.pt") for k in (0, 1)]
    assert len(ensemble.crop.networks) == 2 and all(state["params"] == params.crop.model_dump() for _, state in crops)
    lesion = [np.ones((30, 40), bool)] * 2
    pictures = [np.random.default_rng(k).integers(0, 255, (30, 40), dtype=np.uint8) for k in (0, 1)]
    np.testing.assert_allclose(ensemble.crop.malignant(pictures, lesion),
                               (crops[0][0].malignant(pictures, lesion) + crops[1][0].malignant(pictures, lesion)) / 2,
                               atol=1e-6)

    # MLflow: one parent with the fold mean ± sd, the ensemble's test metrics and model; a child run per fold.
    parent = store.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "resnet18-scse-cv2"
    assert parent.data.metrics["cv/dice_mean"] == pytest.approx(result["mean"]["dice"])
    assert parent.data.metrics["cv/f1_weighted_sd"] == pytest.approx(result["sd"]["f1_weighted"])
    assert parent.data.metrics["test/dice"] == pytest.approx(test["dice"])
    assert parent.data.tags["busi.model_uri"].startswith("models:/")
    children = store.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert sorted(run.info.run_name for run in children) == ["resnet18-scse-fold0", "resnet18-scse-fold1"]
    assert all(run.info.status == "FINISHED" for run in children)

    # The report: one row per cross-validated configuration, each compared with the best on the same images.
    cases = pd.read_csv(tmp_path / "cv/per_image.csv", dtype={"image_id": str})
    worse = cases.assign(tp=0, fn=cases.tp + cases.fn, predicted_label="normal")  # finds no lesion at all
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name="worse-cv2"):
        mlflow.log_metrics({"cv/dice_mean": -1.0, "cv/dice_sd": 0.0, "cv/f1_weighted_mean": 0.0,
                            "cv/f1_weighted_sd": 0.0, "test/dice": 0.0})
        mlflow.log_table(worse, "test_per_image.json")
    text = report(tmp_path / "study.md").read_text()
    section = text.split("## Cross-validated configurations (fold ensembles)")[1].split("## The study")[0]
    rows = [line for line in section.splitlines() if line.startswith("| resnet18") or line.startswith("| worse")]
    assert rows[0].startswith("| resnet18-scse-cv2") and "(best)" in rows[0]
    assert rows[1].startswith("| worse-cv2") and "-" in rows[1].split("|")[-3]
    assert "fold0" not in text  # folds are shown through their parent


def test_a_split_without_folds_is_one_error(processed, tmp_path, store):
    (tmp_path / "splits.csv").write_text("image_id,label,split,group,fold\n")
    with pytest.raises(BusiError, match="splits.csv: .* train/val images have no fold"):
        cross_validate(processed, tmp_path / "splits.csv", processed.parent / "masks", tiny_params(), tmp_path / "cv")


def test_a_schedule_that_watches_the_held_out_images_is_refused_before_anything_runs(processed, tmp_path, store):
    params = tiny_params(scheduler="plateau", monitor="val_dice")
    with pytest.raises(BusiError, match="^grid entry 'steps': train.scheduler: plateau lowers the learning rate on "):
        cross_validate(processed, processed.parent / "splits.csv", processed.parent / "masks", params,
                       tmp_path / "cv", grid={"steps": params})
    assert not (tmp_path / "cv").exists() and not store.search_runs(["0"])


def test_a_grid_trains_fold_by_fold_so_a_stopped_grid_holds_paired_folds(processed, tmp_path, store, monkeypatch):
    """Trained one after the other, a grid of two recipes runs fold 0 of both before fold 1 of either: stopped
    part-way (a session's end, a kill), what is finished compares the recipes on the same held-out images."""
    import busi.stages.cross_validate as stage

    class Stop(Exception):
        """Raised by the stand-in for run_folds: the order is recorded, nothing trains."""

    def record(jobs, *args):
        order.extend((job.out_dir.parent.parent.name, job.fold) for job in jobs)
        raise Stop

    order = []
    monkeypatch.setattr(stage, "run_folds", record)
    grid = {"a": tiny_params(), "b": tiny_params(epochs=2)}
    with pytest.raises(Stop):
        cross_validate(processed, processed.parent / "splits.csv", processed.parent / "masks", tiny_params(),
                       tmp_path / "cv", grid)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_threads_follow_omp_num_threads_else_the_cpu_affinity(monkeypatch):
    """N parallel workers share the cores when each is given OMP_NUM_THREADS: they do not each take all."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_count() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert thread_count() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count() == len(os.sched_getaffinity(0))


def test_a_grid_file_is_checked_before_anything_runs(tmp_path):
    params = tiny_params()
    cases = {"vgg: {model.encodr: vgg16}": "grid.yaml: vgg: model.encodr: no such parameter",
             "vgg: {train.lr: abc}": "grid.yaml: vgg: train.lr: ",
             "Bad Name: {}": "grid.yaml: 'Bad Name': a name is lower-case",
             "[1, 2]": "grid.yaml: a grid is a mapping"}
    for text, message in cases.items():
        (tmp_path / "grid.yaml").write_text(text)
        with pytest.raises(BusiError, match=re.escape(message)):
            load_grid(tmp_path / "grid.yaml", params)
    (tmp_path / "grid.yaml").write_text((REPO / "cv/study.yaml").read_text())
    study = load_grid(tmp_path / "grid.yaml", params)
    assert list(study) == ["vgg16", "vgg19", "resnet50", "resnet50-plain", "dpn68", "resnet18"]
    assert study["resnet50-plain"].model.attention is None and study["vgg19"].train == params.train


def test_a_grid_trains_each_folds_crop_network_once_per_crop_params(tmp_path, monkeypatch):
    """The crop network learns from the fold's images and reference masks, not from the recipe's U-Net: the
    second recipe of a grid copies the first one's, and a recipe with other crop params trains its own."""
    import busi.stages.cross_validate as stage
    from busi import CLASSES

    trained, real = [], stage.train_crop_network

    def counted(*args):
        trained.append(args[-1].seed)
        return real(*args)

    monkeypatch.setattr(stage, "train_crop_network", counted)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(6)]
    references = [np.zeros((48, 48), bool) for _ in range(6)]
    for mask in references:
        mask[10:30, 12:28] = True
    pool = {"labels": np.array([CLASSES.index(c) for c in ["benign", "malignant"] * 3])}
    rows = np.ones(6, bool)
    params = tiny_params()
    other = params.model_copy(update={"crop": params.crop.model_copy(update={"seed": params.crop.seed + 1})})
    crop_files = {}
    for name, config in [("a", params), ("b", params), ("c", other)]:
        stage.fold_crop_network(tmp_path / name / "fold-0", rows, pool, images, references, config, crop_files)
    assert trained == [params.crop.seed, params.crop.seed + 1]
    assert (tmp_path / "b/fold-0/crop.pt").read_bytes() == (tmp_path / "a/fold-0/crop.pt").read_bytes()
    _, state = load_crop_checkpoint(tmp_path / "c/fold-0/crop.pt")
    assert state["params"] == other.crop.model_dump()
