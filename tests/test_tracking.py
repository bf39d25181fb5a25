"""busi.tracking against a real MLflow sqlite store in tmp_path and a real (tiny, untrained) U-Net."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from busi import BusiError, tracking
from busi.config import load_params
from conftest import PARAMS_FILE, run_env

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")
HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "val_loss": 1.1, "train_iou": 0.1, "val_iou": 0.12, "val_dice": 0.2,
     "val_accuracy": 0.5, "lr": 1e-3, "images_per_s": 40.0},
    {"epoch": 2, "train_loss": 0.9, "val_loss": 0.95, "train_iou": 0.3, "val_iou": 0.28, "val_dice": 0.4,
     "val_accuracy": 0.6, "lr": 8e-4, "images_per_s": 41.0},
    {"epoch": 3, "train_loss": 0.7, "val_loss": 0.8, "train_iou": 0.45, "val_iou": 0.4, "val_dice": 0.55,
     "val_accuracy": 0.7, "lr": 5e-4, "images_per_s": 39.5},
]


def tiny_params(**model):
    params = load_params(PARAMS_FILE)
    model = {"encoder": "mobilenet_v2", "encoder_weights": None, **model}
    return params.model_copy(update={
        "model": params.model.model_copy(update=model),
        "preprocess": params.preprocess.model_copy(update={"image_size": SIZE}),
    })


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite database with its tables made: making them takes seconds, copying it does not."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def repo(tmp_path, monkeypatch, empty_store) -> Path:
    """A git repository with one commit, as the working directory; MLflow writes to its own sqlite store."""
    root = tmp_path / "repo"
    root.mkdir()
    git("init", "-q", cwd=root)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start", cwd=root)
    monkeypatch.chdir(root)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",  # MLflow sets the ID itself
                 "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    yield root
    mlflow.end_run()  # a failed test must not leave its run active for the next one
    mlflow.set_tracking_uri(None)


def run_epochs(rows):
    for row in rows:
        tracking.log_epoch(row, epoch=row["epoch"])  # as train.py does: the whole history row


def test_run_records_params_metrics_curves_and_tags(repo, tmp_path):
    params = tiny_params()
    run_id = tracking.start_run(params)
    run_epochs(HISTORY)
    tracking.log_curves(HISTORY)
    tracking.end_run()

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mobilenet_v2-scse"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "busi"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs
    assert run.data.tags["git_commit"] == git("rev-parse", "HEAD", cwd=repo)
    assert "dvc_exp_name" not in run.data.tags
    logged = run.data.params
    assert logged["model.encoder"] == "mobilenet_v2"
    assert logged["model.attention"] == "scse"
    assert logged["preprocess.image_size"] == str(SIZE)
    assert logged["augment.affine.p"] == str(params.augment.affine.p)
    assert logged["split.fractions.train"] == str(params.split.fractions.train)
    assert {k: v for k, v in logged.items() if k.startswith("train.")} == {
        f"train.{k}": str(v) for k, v in params.train.model_dump().items()}
    assert not any(value.startswith("{'") for value in logged.values())  # every section flattened to leaves
    for key in ("val_loss", "train_iou", "val_dice", "val_accuracy", "lr"):
        history = client.get_metric_history(run_id, tracking.curve_name(key))
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (row["epoch"], row[key]) for row in HISTORY]
    assert "epoch" not in run.data.metrics
    png = Path(client.download_artifacts(run_id, "training_curves.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlruns").is_dir() and not (repo / "mlruns").exists()  # artifacts beside the database


def test_dvc_experiment_names_the_run(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "bonny-lama")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "busi-sweep")
    run_id = tracking.start_run(tiny_params(attention=None))
    tracking.end_run()

    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "mobilenet_v2-plain-bonny-lama"
    assert run.data.tags["dvc_exp_name"] == "bonny-lama"
    assert run.data.tags["dvc_exp_baseline_rev"] == "0123456789abcdef0123456789abcdef01234567"
    assert run.data.params["model.attention"] == "None"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "busi-sweep"


def test_resuming_appends_to_the_same_run(repo):
    params = tiny_params()
    run_id = tracking.start_run(params)
    run_epochs(HISTORY[:2])
    tracking.end_run("KILLED")
    MlflowClient().update_run(run_id, status="RUNNING")  # what a training killed after epoch 2 leaves behind

    assert tracking.start_run(params, run_id=run_id) == run_id
    assert mlflow.active_run().info.status == "RUNNING"
    run_epochs(HISTORY[2:])
    tracking.end_run()

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mobilenet_v2-scse"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/dice")) == [1, 2, 3]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]


def test_project_root_of_a_queued_dvc_experiment_is_the_original_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    for copy in ("tmpa1b2c3d4", "standalone/tmpz9y8x7"):  # --queue (celery) and --temp copies
        workdir = root / ".dvc" / "tmp" / "exps" / copy / "src"
        workdir.mkdir(parents=True)
        monkeypatch.chdir(workdir)
        assert tracking.project_root() == root.resolve()
        assert tracking.tracking_uri() == f"sqlite:///{root.resolve()}/mlflow.db"


def test_project_root_is_the_git_top_level_or_dvc_root(repo, tmp_path, monkeypatch):
    (repo / "src" / "busi").mkdir(parents=True)
    monkeypatch.chdir(repo / "src" / "busi")
    assert tracking.project_root() == repo.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets for a stage, and for an experiment's copy
    assert tracking.project_root() == tmp_path.resolve()


def test_credentials_in_a_tracking_uri_never_reach_a_message(tmp_path, monkeypatch):
    assert tracking.shown_uri("https://alice:s3cret@mlflow.example.org:5000/x?token=abc") == \
        "https://***@mlflow.example.org:5000/x?***"
    assert tracking.shown_uri("sqlite:////repo/mlflow.db") == "sqlite:////repo/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9/")  # nothing listens on port 9
    (tmp_path / "train.json").write_text('{"run_id": "0123"}')
    try:
        # Unreachable: one line at once (MLflow alone retries for minutes, then prints the whole URI).
        with pytest.raises(BusiError, match=r"^MLflow tracking server http://\*\*\*@127.0.0.1:9/ unreach") as err:
            tracking.training_run_id(tmp_path / "train.json")
        assert "s3cret" not in str(err.value)
        result = subprocess.run([sys.executable, "-m", "busi", "report", "--out", str(tmp_path / "r.md")],
                                env=run_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr + result.stdout and "***@127.0.0.1:9" in result.stderr
    finally:
        mlflow.set_tracking_uri(None)


def test_a_traceback_never_shows_the_tracking_password(monkeypatch):
    from busi.cli import redact

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org/?token=t0k")
    text = 'requests.exceptions.ConnectionError: https://alice:s3cret@mlflow.example.org/?token=t0k\nauth s3cret'
    assert redact(text) == ("requests.exceptions.ConnectionError: https://***@mlflow.example.org/?***\n"
                            "auth ***")


def test_metric_names_make_sections_of_the_run_page():
    assert [tracking.curve_name(c) for c in ("train_loss", "val_dice", "val_raw_iou", "lr", "train_images_per_s")] == [
        "train/loss", "val/dice", "val_raw/iou", "train/lr", "train/images_per_s"]
    metrics = {"dice": 0.7, "images": 115, "ci95": {"dice": {"low": 0.6, "high": 0.8}},
               "per_class": {"malignant": {"dice": 0.5, "iou": 0.33}}, "postprocessing": {"flip_tta": True}}
    assert tracking.evaluation_names("test", metrics) == {
        "test/dice": 0.7, "test/images": 115, "test_ci95/dice_low": 0.6, "test_ci95/dice_high": 0.8,
        "test_detail/per_class.malignant.dice": 0.5, "test_detail/per_class.malignant.iou": 0.33}  # booleans: tags
    assert tracking.cv_names({"mean": {"dice": 0.7}, "sd": {"dice": 0.1}, "minutes": 3.5, "folds": 5}) == {
        "cv/dice_mean": 0.7, "cv/dice_sd": 0.1, "cv/minutes": 3.5}


def test_a_run_killed_while_it_was_re_evaluated_keeps_its_last_evaluation(repo):
    """SIGKILL while evaluate adds to a FINISHED training run leaves it RUNNING: the report still counts it when a
    complete evaluation (its model URI tag, set only once a model is fully logged) is there; a training killed
    mid-way is not counted."""
    params = tiny_params()
    evaluated, training = tracking.start_run(params), None
    tracking.end_run()
    MlflowClient().set_tag(evaluated, tracking.MODEL_URI_TAG, "models:/m-1")
    MlflowClient().update_run(evaluated, status="RUNNING")
    training = tracking.start_run(params)
    tracking.end_run()
    MlflowClient().update_run(training, status="RUNNING")

    runs, others, _ = tracking.finished_runs("busi")
    assert [run.info.run_id for run in runs] == [evaluated] and others == 1
