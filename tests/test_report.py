"""busi.commands.report against a real sqlite MLflow store: two tiny trainings, test metrics logged as evaluate will."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from busi import BusiError, tracking
from busi.cli import build_parser
from busi.commands.report import plot_curves, read_curves, report
from busi.training import train
from conftest import PARAMS_FILE, SIZE, run_env, tiny_params

# What the evaluate stage logs into the training run (metrics/test.json, named by busi.tracking), for two runs.
TEST_METRICS = {
    "resnet18-scse": {"iou": 0.41234, "dice": 0.58, "pixel_accuracy": 0.951, "f1_weighted": 0.877,
                      "dice_per_image": 0.55, "ci95.dice.low": 0.52, "ci95.dice.high": 0.635, "ci95.iou.low": 0.35,
                      "ci95.iou.high": 0.47, "per_class.malignant.dice": 0.5},
    "resnet18-plain": {"iou": 0.5, "dice": 0.66, "pixel_accuracy": 0.96, "f1_weighted": 0.8},
    "no-lesion": {"pixel_accuracy": 0.99, "images": 3},  # a test split without lesions: no Dice, no IoU
}
# And the validation split's (metrics/val.json): runs are ranked on these, where they exist.
VAL_METRICS = {"resnet18-scse": {"dice": 0.7, "f1_weighted": 0.75}}


def small_params(epochs: int, attention: str | None):
    params = tiny_params(epochs=epochs, max_train_images=4)
    return params.model_copy(update={
        "model": params.model.model_copy(update={"attention": attention}),
        "preprocess": params.preprocess.model_copy(update={"image_size": SIZE}),  # as `processed` was made
    })


@pytest.fixture(scope="module")
def study(processed, tmp_path_factory):  # noqa: F811
    """Two finished, evaluated trainings, finished runs with some and without test metrics, a failed one."""
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "DVC_EXP_NAME"):
            env.delenv(name, raising=False)
        try:
            configs = {"resnet18-scse": small_params(2, "scse"), "resnet18-plain": small_params(3, None)}
            summaries = {name: train(processed, params, root / name, root / f"{name}.json", root / f"{name}.csv")
                         for name, params in configs.items()}
        finally:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment put it there
            mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("busi").experiment_id
    run_ids = {name: summary["run_id"] for name, summary in summaries.items()}
    for name, status in [("no-lesion", "FINISHED"), ("not-evaluated", "FINISHED"), ("crashed", "FAILED")]:
        run_ids[name] = client.create_run(experiment, run_name=name).info.run_id
        client.log_metric(run_ids[name], "val/loss", 1.0, timestamp=1000, step=1)
        client.log_metric(run_ids[name], "val/loss", 0.5, timestamp=2000, step=1)  # epoch 1 again, resumed
        client.set_terminated(run_ids[name], status)
    for split, logged in (("test", TEST_METRICS), ("val_eval", VAL_METRICS)):
        for name, metrics in logged.items():
            for key, value in tracking.evaluation_names(split, metrics).items():
                client.log_metric(run_ids[name], key, value)
    return root, uri, summaries


@pytest.fixture
def store(study, monkeypatch):
    root, uri, summaries = study
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return root, summaries


def table_rows(text: str, section: str) -> list[list[str]]:
    """The cells of the first markdown table after `section`'s heading, without its header."""
    lines = text[text.index(section):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_table_has_one_row_per_evaluated_run_beside_the_study(store, tmp_path):
    root, summaries = store
    out = report(tmp_path / "reports" / "study.md", None)
    text = out.read_text()
    rows = table_rows(text, "## Test split")
    plain, scse = summaries["resnet18-plain"], summaries["resnet18-scse"]
    no_lesion = rows.pop()  # no Dice: last
    assert no_lesion[0].startswith("no-lesion (") and no_lesion[4:] == ["?", "?", "–", "–", "–", "–", "0.990", "–",
                                                                         "–", "–", "–", "–", "–", "–", "–"]
    assert rows == [  # best validation Dice first, then the runs without one by test Dice
        [f"resnet18-scse (`{scse['run_id'][:8]}`)", "resnet18", "scse", "none", "64",
         f"2 / {scse['best_epoch']}", "0.700", "0.750", "0.412 [0.350, 0.470]", "0.580 [0.520, 0.635]", "0.951",
         "0.877", "0.550", "–", "–", "–", "–", "0.500", "–"],  # accuracy, AUC, ECEs not logged
        [f"resnet18-plain (`{plain['run_id'][:8]}`)", "resnet18", "none", "none", "64",
         f"3 / {plain['best_epoch']}", "–", "–", "0.500", "0.660", "0.960", "0.800", "–", "–", "–", "–", "–", "–", "–"],
    ]
    assert "Not evaluated (no test metrics; their curves are in the figure): not-evaluated (`" in text
    assert "crashed" not in text and "left out: 1 runs not finished" in text
    study = table_rows(text, "## The study's Table 1")
    assert len(study) == 5 and study[0] == ["VGG16 + attention", "0.41", "0.58", "0.95", "0.877"]
    assert study[2] == ["ResNet50 + attention", "0.50", "0.66", "0.95", "0.82"]
    figure = out.with_name("study_val_curves.png")
    assert f"]({figure.name})" in text
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.size == (1200, 480)
    assert sorted(p.name for p in out.parent.iterdir()) == ["study.md", "study_val_curves.png"]  # no temporaries


def test_a_new_metric_is_a_column_of_the_report(store, tmp_path, extra_metric):
    text = report(tmp_path / "study.md", None).read_text()
    assert "| normal FP rate | lesions drawn |" in text  # the runs table's header: METRICS in order


def test_figure_overlays_every_finished_runs_validation_curves(store):
    root, summaries = store
    runs, _, _ = tracking.finished_runs("busi")
    fig = plot_curves(runs, read_curves(runs))
    loss, iou = fig.axes
    assert (loss.get_title(), iou.get_title()) == ("validation loss", "validation IoU")
    for ax, key in [(loss, "val_loss"), (iou, "val_iou")]:
        lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
        assert sorted(lines) == ["no-lesion", "not-evaluated", "resnet18-plain", "resnet18-scse"]
        for name in summaries:
            with (root / f"{name}.csv").open() as f:  # the training's own history, rounded to 6 digits
                history = [(int(row["epoch"]), float(row[key])) for row in csv.DictReader(f)]
            drawn = list(zip(lines[name].get_xdata(), lines[name].get_ydata(), strict=True))
            assert [e for e, _ in drawn] == [e for e, _ in history]
            assert [v for _, v in drawn] == pytest.approx([v for _, v in history], abs=1e-6)
    resumed = next(line for line in loss.get_lines() if line.get_label().startswith("not-evaluated"))
    assert list(resumed.get_ydata()) == [0.5]  # an epoch logged twice: the later value


def test_the_report_is_logged_to_one_run_of_the_experiment(store, tmp_path):
    first = report(tmp_path / "one" / "study.md", None).read_text()
    second = report(tmp_path / "two" / "study.md", None).read_text()
    assert second == first  # the report's own run is not a row
    client = MlflowClient()
    experiment = client.get_experiment_by_name("busi").experiment_id
    logged = client.search_runs([experiment], filter_string="tags.`busi.report` = 'study'")
    assert [run.info.run_name for run in logged] == ["study-report"]  # one run, updated by the second report
    run_id = logged[0].info.run_id
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["study.md", "study_val_curves.png"]
    assert Path(client.download_artifacts(run_id, "study.md", str(tmp_path / "dl"))).read_text() == second


def test_a_missing_or_empty_experiment_is_one_error(store, tmp_path, monkeypatch):
    with pytest.raises(BusiError, match="experiment 'nope' not found"):
        report(tmp_path / "study.md", "nope")
    MlflowClient().create_experiment("empty", artifact_location=tmp_path.as_uri())
    with pytest.raises(BusiError, match="experiment 'empty' .* has no finished runs"):
        report(tmp_path / "study.md", "empty")
    assert not (tmp_path / "study.md").exists()

    result = subprocess.run([sys.executable, "-m", "busi", "--params", str(PARAMS_FILE), "report",
                             "--experiment", "nope", "--out", str(tmp_path / "study.md")],
                            env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: MLflow experiment 'nope' not found in "
                                          f"{os.environ['MLFLOW_TRACKING_URI']}: train a model first"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    with pytest.raises(BusiError, match="no MLflow store at"):
        report(tmp_path / "study.md", None)
    assert not (tmp_path / "none.db").exists()  # not created by asking


def test_where_keeps_the_runs_that_pass_an_mlflow_filter(store, tmp_path):
    root, summaries = store
    text = report(tmp_path / "study.md", None, "params.`model.attention` = 'scse'").read_text()
    rows = table_rows(text, "## Test split")
    assert [row[0] for row in rows] == [f"resnet18-scse (`{summaries['resnet18-scse']['run_id'][:8]}`)"]
    assert "(runs where `params.`model.attention` = 'scse'`)" in text and "resnet18-plain" not in text
    with pytest.raises(BusiError, match="--where 'params.nope ==': not an MLflow search filter"):
        report(tmp_path / "bad.md", None, "params.nope ==")
    with pytest.raises(BusiError, match="has no finished runs matching"):
        report(tmp_path / "none.md", None, "params.`model.encoder` = 'vgg19'")


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_recipe_table_compares_out_of_fold_predictions_with_the_baseline(tmp_path, monkeypatch):
    """Two cross-validations whose OOF tables differ only in the labels: the baseline calls one benign image
    malignant and the normal one benign; the other recipe gets all four right. Weighted F1 by hand: baseline
    benign F1 2*1/(2+2) = 0.5 (2 images), malignant 2*1/(1+2) = 0.667 (1), normal 0 (1): (1 + 0.667) / 4 = 0.417;
    the recipe 1.0, so Δ +0.583. The masks are the same, so Δ per-image Dice is exactly 0, and so are the class
    probabilities, so Δ malignant AUC is exactly 0."""
    from busi.evaluation.metrics import case_table

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    client = MlflowClient(uri)
    experiment = client.create_experiment("busi", artifact_location=(tmp_path / "artifacts").as_uri())
    lesion = np.zeros((4, 4), bool)
    lesion[:2, :2] = True
    references = [lesion, lesion, lesion, np.zeros((4, 4), bool)]
    predictions = [lesion, lesion, np.zeros((4, 4), bool), np.zeros((4, 4), bool)]
    head = np.full((4, 3), 1 / 3)
    for name, sampling, predicted in [("today", "uniform", [0, 1, 1, 0]), ("balanced", "balanced", [0, 0, 1, 2])]:
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "train.sampling", sampling)
        client.log_param(run.info.run_id, "model.encoder", "resnet18")
        client.log_metric(run.info.run_id, "cv/dice_mean", 0.5)
        cases = case_table(["a", "b", "c", "d"], [0, 0, 1, 2], predicted, predictions, references, head)
        with mlflow.start_run(run_id=run.info.run_id):
            mlflow.log_table(cases, "oof_per_image.json")
        mlflow.set_tracking_uri(None)
    text = report(tmp_path / "study.md", None).read_text()
    rows = table_rows(text, "## Recipes, judged on out-of-fold predictions")
    assert [row[0].split(" (")[0] for row in rows] == ["today", "balanced"]  # the oldest is the baseline
    assert rows[0][0].endswith(": baseline") and rows[1][0].endswith(": train.sampling=balanced")
    assert rows[0][2].startswith("0.417 [") and rows[1][2].startswith("1.000 [")
    assert rows[0][-3:] == ["(baseline)"] * 3  # weighted F1, per-image Dice, malignant AUC
    assert rows[1][-3].startswith("+0.583 [") and rows[1][-2] == "+0.000 [+0.000, +0.000], p 1.000"
    assert rows[1][-1] == "+0.000 [+0.000, +0.000], p 1.000"  # the same class probabilities: the same ranking
    named = table_rows(report(tmp_path / "again.md", None, baseline="balanced").read_text(), "## Recipes")
    assert named[0][0].split(" (")[0] == "balanced" and named[1][-3].startswith("-0.583 [")
    with pytest.raises(BusiError, match="--baseline 'nope'"):
        report(tmp_path / "bad.md", None, baseline="nope")


def test_report_without_out_never_touches_the_committed_study_table():
    """`busi report` with no --out writes reports/runs.md (git-ignored): the committed cross-validated grid in
    reports/study.md is only rewritten when a user names it."""
    assert build_parser().parse_args(["report"]).out == Path("reports/runs.md")
    ignored = subprocess.run(["git", "check-ignore", "reports/runs.md", "reports/runs_val_curves.png"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert ignored.stdout.split() == ["reports/runs.md", "reports/runs_val_curves.png"]
