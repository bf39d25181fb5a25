"""MLflow tracking for training: one run per training (resumable), its params, metrics, curves and model.

Records go to the repository's mlflow.db (or MLFLOW_TRACKING_URI), also from DVC experiments that run in
temporary copies of the repository under .dvc/tmp/exps/.
"""

import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state; PNGs render with Agg

from busi.config import Params

PACKAGE = Path(__file__).resolve().parent
EXP_TMP = (".dvc", "tmp", "exps")  # where `dvc exp run --queue/--temp` copies the repository
# What the served model imports (busi.model and busi.config), pinned to the versions trained with.
SERVING_PACKAGES = ("mlflow", "torch", "segmentation-models-pytorch", "timm", "pydantic", "pyyaml", "numpy", "pandas")


def project_root() -> Path:
    """The repository root; for a DVC experiment running in a temporary copy, the original repository's."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - len(EXP_TMP)):
        if parts[i + 1 : i + 1 + len(EXP_TMP)] == EXP_TMP:
            return Path(*parts[: i + 1])
    # DVC_ROOT: set by `dvc repro` / `dvc exp run` to the root of the repository the experiment belongs to.
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = git("rev-parse", "--show-toplevel", cwd=cwd)
    return Path(top) if top else cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root()}/mlflow.db"


def start_run(params: Params, run_id: str | None = None) -> str:
    """Start a run, or resume `run_id` (a training restarted after a kill continues its own run)."""
    mlflow.set_tracking_uri(tracking_uri())
    set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "busi")
    if run_id:
        return mlflow.start_run(run_id=run_id).info.run_id
    exp_name = os.environ.get("DVC_EXP_NAME")
    name = f"{params.model.encoder}-{params.model.attention or 'plain'}" + (f"-{exp_name}" if exp_name else "")
    commit = git("rev-parse", "HEAD", cwd=project_root())
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "dvc_exp_name": exp_name,
            "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    run = mlflow.start_run(run_name=name, tags={key: value for key, value in tags.items() if value})
    mlflow.log_params(flatten(params.model_dump(mode="json")))
    return run.info.run_id


def set_experiment(name: str) -> None:
    """Like mlflow.set_experiment, but a new experiment on a local sqlite store keeps its artifacts beside the
    database, not in the working directory (which, for a queued DVC experiment, is deleted afterwards)."""
    if mlflow.get_experiment_by_name(name) is None:
        uri = urlparse(mlflow.get_tracking_uri())
        if uri.scheme == "sqlite":
            db = Path(uri.path[1:])  # sqlite:////abs/mlflow.db or sqlite:///relative/mlflow.db
            artifacts = (db.parent / "mlruns").resolve().as_uri()
            mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"augment": {"affine": {"p": 0.5}}} -> {"augment.affine.p": 0.5}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """One history row: the epoch is the step, not a metric of its own."""
    mlflow.log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step=epoch)


def log_curves(history: list[dict[str, float]]) -> None:
    """Loss, IoU, Dice and accuracy per epoch, train and val, as training_curves.png."""
    panels = {"loss": "Loss", "iou": "IoU", "dice": "Dice", "accuracy": "Accuracy"}
    fig = Figure(figsize=(4 * len(panels), 3.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    epochs = [row["epoch"] for row in history]
    for ax, (metric, title) in zip(axes, panels.items(), strict=True):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            if any(key in row for row in history):
                ax.plot(epochs, [row.get(key, float("nan")) for row in history], marker=".", label=split)
        ax.set(title=title, xlabel="epoch")
        if ax.has_data():
            ax.legend()
    mlflow.log_figure(fig, "training_curves.png")


def log_model(checkpoint: Path) -> str:
    """Log the model as models-from-code pyfunc: serving rebuilds it from the weights, never unpickles code."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PACKAGE / "mlflow_model.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(PACKAGE)],
        # without a local build tag such as +cu128: those are not on PyPI
        pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in SERVING_PACKAGES],
    )
    return info.model_uri


def end_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status=status)
