"""Every MLflow call of the project: one run per training (resumable) with its params and curves; the evaluation
added to that run (metrics, tables, figures and the predictor as the MLflow model); the reads of `report`.

Records go to the repository's mlflow.db (or MLFLOW_TRACKING_URI), also from DVC experiments that run in
temporary copies of the repository under .dvc/tmp/exps/.
"""

import fcntl
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state; PNGs render with Agg
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from busi import BusiError
from busi.config import Params

# MLflow's INFO lines (database creation, input example validation) and, off a terminal, its artifact progress
# bars are noise in a stage's log; warnings and errors still show.
logging.getLogger("mlflow").setLevel(logging.WARNING)
if not sys.stderr.isatty():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PACKAGE = Path(__file__).resolve().parent
EXP_TMP = (".dvc", "tmp", "exps")  # where `dvc exp run --queue/--temp` copies the repository
# What the served model imports (busi.model and what it uses), pinned to the versions trained with.
SERVING_PACKAGES = ("mlflow", "torch", "segmentation-models-pytorch", "timm", "pydantic", "pyyaml", "numpy", "pandas",
                    "scikit-learn", "opencv-python-headless", "pillow", "safetensors")
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI: what the experiment page opens on
REPORT_TAG = "busi.report"  # on the run that holds the report's own files
MODEL_URI_TAG = "busi.model_uri"  # set once an evaluation's model is completely logged
SERVER_TIMEOUT_S = 5  # to connect to a tracking server
MAX_RUNS = 50_000  # MLflow's largest page; a study has tens of runs


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
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root()}/mlflow.db"
    check_server(uri)
    return uri


def existing_store() -> str:
    """The tracking URI, for commands that only read: a sqlite file that is not there is an error naming the path
    (MLflow would create an empty store in the current folder, and then find nothing in it)."""
    uri = tracking_uri()
    db = urlparse(uri)
    if db.scheme == "sqlite" and not Path(db.path[1:]).is_file():
        raise BusiError(f"no MLflow store at {uri}: train a model first, run from the repository, "
                        "or set MLFLOW_TRACKING_URI")
    return uri


@functools.cache
def check_server(uri: str) -> None:
    """A tracking server that cannot be reached is one line at once (MLflow itself retries for minutes and then
    prints a traceback holding the whole URI, credentials included)."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=SERVER_TIMEOUT_S).close()
    except OSError as err:
        raise BusiError(f"MLflow tracking server {shown_uri(uri)} unreachable ({err.strerror or err}); start it, "
                        "or unset MLFLOW_TRACKING_URI to use the repository's mlflow.db") from None


def shown_uri(uri: str) -> str:
    """A tracking URI fit for messages and reports: user, password and query (tokens) removed."""
    parts = urlparse(uri)
    if not (parts.username or parts.password or parts.query):
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}{f':{parts.port}' if parts.port else ''}" if parts.username or parts.password else host
    return parts._replace(netloc=netloc, query="***" if parts.query else "").geturl()


def start_run(params: Params, run_id: str | None = None, parent_run_id: str | None = None, suffix: str = "",
              tags: dict | None = None) -> str:
    """Start a run (a child of `parent_run_id`, a fold of a cross-validation, when given), or resume `run_id`
    (a training restarted after a kill continues its own run); `tags` (where it runs) are set either way."""
    open_store()
    if run_id:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(tags or {})
        return run.info.run_id
    name, run_tags = run_name_and_tags(params, suffix)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
        # A fold started over (its worker died on another node, which kept no checkpoint) goes on in its own run.
        client = mlflow.MlflowClient()
        unfinished = client.search_runs([client.get_run(parent_run_id).info.experiment_id], max_results=1,
                                        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                        f"attributes.run_name = '{name}' and attributes.status != 'FINISHED'")
        if unfinished:
            run = mlflow.start_run(run_id=unfinished[0].info.run_id)
            mlflow.set_tags(tags or {})
            return run.info.run_id
    run = mlflow.start_run(run_name=name, tags=run_tags | (tags or {}))
    mlflow.log_params(flatten(params.model_dump(mode="json")))
    return run.info.run_id


@dataclass
class TrainingRun:
    """A training's MLflow run, as the callbacks the training loop calls (busi.training.train): its own run, or a
    fold's child run of a cross-validation (`parent_run_id`, its name ending in `suffix`); `tags`: where it ran."""
    params: Params
    parent_run_id: str | None = None
    suffix: str = ""
    tags: dict = field(default_factory=dict)

    def started(self, run_id: str | None) -> str:
        """The run a training starts, or the one a resumed training (its checkpoint's `run_id`) goes on in."""
        return start_run(self.params, run_id, self.parent_run_id, self.suffix, self.tags)

    def epoch(self, row: dict[str, float]) -> None:
        log_epoch(row, row["epoch"])

    def finished(self, history: list[dict[str, float]]) -> None:
        log_curves(history)
        end_run()

    def failed(self, err: BaseException) -> None:
        end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")


def start_parent_run(params: Params, suffix: str) -> str:
    """A run that holds others (the folds of a cross-validation), created without becoming the active run; it
    stays RUNNING until log_evaluation (or end_parent_run) closes it."""
    open_store()
    name, tags = run_name_and_tags(params, suffix)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment_name()).experiment_id
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for key, value in flatten(params.model_dump(mode="json")).items():
        client.log_param(run_id, key, value)
    return run_id


def end_parent_run(run_id: str, status: str) -> None:
    mlflow.MlflowClient().set_terminated(run_id, status)


def run_status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def run_name_and_tags(params: Params, suffix: str) -> tuple[str, dict]:
    exp_name = os.environ.get("DVC_EXP_NAME")
    name = (f"{params.model.encoder}-{params.model.attention or 'plain'}{suffix}"
            + (f"-{exp_name}" if exp_name else ""))
    commit = git("rev-parse", "HEAD", cwd=project_root())
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "dvc_exp_name": exp_name,
            "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    return name, {key: value for key, value in tags.items() if value}


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "busi"


def open_store() -> None:
    """Point MLflow at the store and make sure the experiment exists. On a local sqlite store this happens under
    a file lock: parallel workers (`dvc queue start -j 2`) would otherwise both create its tables at once and
    one fails (alembic's "Online migration expected to match one row")."""
    mlflow.set_tracking_uri(tracking_uri())
    uri = urlparse(mlflow.get_tracking_uri())
    if uri.scheme != "sqlite":
        set_experiment(experiment_name())
        return
    lock = Path(uri.path[1:] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        set_experiment(experiment_name())


def set_experiment(name: str) -> None:
    """Like mlflow.set_experiment, but the experiment is marked as model training (MLflow 3's UI then opens it
    on its runs, not on its GenAI overview), and a new one on a local sqlite store keeps its artifacts beside the
    database, not in the working directory (which, for a queued DVC experiment, is deleted afterwards)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        uri = urlparse(mlflow.get_tracking_uri())
        artifacts = None
        if uri.scheme == "sqlite":
            db = Path(uri.path[1:])  # sqlite:////abs/mlflow.db or sqlite:///relative/mlflow.db
            artifacts = (db.parent / "mlruns").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND: "custom_model_development"})
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


# Metric names. The MLflow run page makes a section of each prefix before a "/": the curves (`train/`, `val/`,
# `val_raw/`), one value per epoch; the evaluation's top-level metrics (`test/`, `val_eval/`: the validation split
# scored as the test split is), their 95% intervals (`test_ci95/`), the nested ones such as per class
# (`test_detail/`, `val_eval_detail/`); a cross-validation's parent run adds `cv/`. Every name is made, and read
# back, here.
CURVE_SPLITS = ("val_raw", "train", "val", "pretrain")  # columns <split>_<metric>; `lr` belongs to training


def curve_name(column: str) -> str:
    """A history column as an MLflow metric: train_loss -> train/loss, val_raw_dice -> val_raw/dice, lr -> train/lr."""
    split = next((s for s in CURVE_SPLITS if column.startswith(f"{s}_")), None)
    return f"{split}/{column[len(split) + 1:]}" if split else f"train/{column}"


def evaluation_names(split: str, metrics: dict) -> dict[str, float]:
    """The numeric leaves of an evaluation's metrics (metrics/test.json's layout) under `split`'s sections."""
    names = {}
    for key, value in flatten(metrics).items():
        if not is_number(value):
            continue
        if "." not in key:
            names[f"{split}/{key}"] = value
        elif key.startswith("ci95."):  # ci95.<metric>.<low|high>
            metric, bound = key.removeprefix("ci95.").rsplit(".", 1)
            names[f"{split}_ci95/{metric}_{bound}"] = value
        else:
            names[f"{split}_detail/{key}"] = value
    return names


def metric(run: Run, split: str, key: str, bound: str | None = None) -> float | None:
    """A run's evaluation metric as evaluation_names named it (`bound`: "low"/"high" of its 95% interval)."""
    name = f"{split}_ci95/{key}_{bound}" if bound else f"{split}_detail/{key}" if "." in key else f"{split}/{key}"
    return run.data.metrics.get(name)


def has_evaluation(run: Run) -> bool:
    return any(name.startswith("test/") for name in run.data.metrics)


def cv_names(cv: dict) -> dict[str, float]:
    names = {f"cv/{key}_{stat}": value for stat in ("mean", "sd") for key, value in cv.get(stat, {}).items()}
    return names | ({"cv/minutes": cv["minutes"]} if "minutes" in cv else {})


def cv_metric(run: Run, key: str, stat: str) -> float | None:
    """A cross-validation's fold `stat` ("mean", "sd") of `key`, or its "minutes"; None for other runs."""
    if stat == "minutes":
        return run.data.metrics.get("cv/minutes")
    return run.data.metrics.get(f"cv/{key}_{stat}")


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """One history row: the epoch is the step, not a metric of its own."""
    mlflow.log_metrics({curve_name(key): value for key, value in metrics.items() if key != "epoch"}, step=epoch)


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


def end_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status=status)


def training_run_id(train_metrics_json: Path) -> str:
    """The MLflow run id the training wrote, checked to exist in the tracking store."""
    try:
        run_id = json.loads(Path(train_metrics_json).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BusiError(f"{train_metrics_json}: no training run id ({type(err).__name__}: {err}); "
                        "run `dvc repro train`") from None
    mlflow.set_tracking_uri(tracking_uri())
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise BusiError(f"{train_metrics_json}: MLflow run {run_id} is not in the tracking store "
                        f"{shown_uri(tracking_uri())} (set MLFLOW_TRACKING_URI, or re-run training)") from None
    return run_id


def log_evaluation(run_id: str, metrics: dict, val_metrics: dict, tables: dict[str, pd.DataFrame],
                   figures: dict[str, Figure], predictor_dir: Path, serving, cv: dict | None = None) -> str:
    """Add an evaluation to the training's run: the test and validation metrics (evaluation_names; booleans, such
    as the post-processing decisions, as `test.<key>` tags), the tables, the figures, and the predictor as the
    run's MLflow model (`serving`: the busi.model.serving module); for a cross-validation's parent run, `cv`
    (busi.stages.cross_validate's summary) as `cv/<metric>_mean`, `cv/<metric>_sd` and `cv/minutes`.
    Returns the model's URI."""
    flat = flatten(metrics)
    with resumed(run_id):
        mlflow.log_metrics(evaluation_names("test", metrics) | evaluation_names("val_eval", val_metrics)
                           | cv_names(cv or {}))
        mlflow.set_tags({f"test.{k}": str(v) for k, v in flat.items() if isinstance(v, bool)})
        for name, table in tables.items():
            log_table(run_id, table, name)
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
        model_uri = log_model(predictor_dir, serving)
        mlflow.set_tag(MODEL_URI_TAG, model_uri)
    return model_uri


@contextmanager
def resumed(run_id: str):
    """The finished run `run_id` as the active run, finished again afterwards. Not mlflow.start_run's context
    manager: a failure while adding to it must not mark the training run FAILED."""
    # start_run refuses a run outside the active experiment (one set earlier in this process, or by the environment)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run()


def external_section(name: str) -> str:
    """The MLflow section of an external dataset's metrics: external_<name>/dice, external_<name>_ci95/..."""
    return f"external_{name}"


def external_datasets(run: Run) -> list[str]:
    """The external datasets a run was scored on (every evaluation logs `<section>/images`)."""
    return sorted(name.removeprefix("external_").removesuffix("/images") for name in run.data.metrics
                  if name.startswith("external_") and name.endswith("/images"))


def model_run(run_id: str | None, model: str) -> Run:
    """The training (or cross-validation) run a predictor came from, checked to be in the tracking store."""
    mlflow.set_tracking_uri(tracking_uri())
    if not run_id:
        raise BusiError(f"{model}: the model names no MLflow run (a training checkpoint, not the evaluate stage's "
                        "predictor?); give a predictor, or pass --no-mlflow")
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise BusiError(f"{model}: its MLflow run {run_id} is not in the tracking store {shown_uri(tracking_uri())} "
                        "(set MLFLOW_TRACKING_URI, or pass --no-mlflow)") from None


def log_external(run_id: str, name: str, metrics: dict, table: pd.DataFrame, figure: Figure) -> None:
    """An external dataset's evaluation added to the model's run, in its own sections (external_section), with
    its per-image table and figure."""
    section = external_section(name)
    with resumed(run_id):
        mlflow.log_metrics(evaluation_names(section, metrics))
        log_table(run_id, table, f"{section}_per_image.json")
        mlflow.log_figure(figure, f"{section}_cases.png")


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_table(run_id: str, table: pd.DataFrame, name: str) -> None:
    """mlflow.log_table appends to a table the run already has: a re-evaluation replaces it instead, written in
    the same layout (pandas' split orient) that log_table uses and the MLflow UI reads."""
    if name in {artifact.path for artifact in mlflow.MlflowClient().list_artifacts(run_id)}:
        mlflow.log_text(table.to_json(orient="split", index=False), name)
    else:
        mlflow.log_table(table, name)


def log_model(predictor_dir: Path, serving) -> str:
    """Log the predictor folder as a models-from-code pyfunc (the `serving` module's file) with its signature and
    input example: serving rebuilds the networks from their weights, never unpickles code."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=serving.__file__,
        artifacts={"predictor": str(predictor_dir)},
        code_paths=[str(PACKAGE)],
        signature=serving.SIGNATURE,
        input_example=serving.input_example(),
        # without a local build tag such as +cu128: those are not on PyPI
        pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in SERVING_PACKAGES],
    )
    return info.model_uri


def download_predictor(uri: str, dst: Path) -> Path:
    """Download a logged model and return its predictor folder."""
    mlflow.set_tracking_uri(existing_store())
    try:
        folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
        # The MLmodel file says where log_model put the artifact inside the model folder.
        artifacts = mlflow.models.Model.load(folder).flavors["python_function"]["artifacts"]
        entry = artifacts["predictor"]
    except (MlflowException, OSError, KeyError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BusiError(f"{uri}: cannot load a busi model from this MLflow URI ({first_line})") from None
    return folder / entry["path"]


def finished_runs(experiment: str, where: str = "") -> tuple[list[Run], int, str]:
    """The experiment's FINISHED runs (oldest first) but the report's own, how many others it has, and the store's
    URI; `where`: an MLflow search filter (e.g. "params.`train.epochs` = '3'") that every run must pass."""
    uri = existing_store()
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise BusiError(f"MLflow experiment {experiment!r} not found in {shown_uri(uri)}: train a model first")
    try:
        runs = client.search_runs([found.experiment_id], filter_string=where, max_results=MAX_RUNS,
                                  order_by=["attributes.start_time ASC"])
    except MlflowException as err:
        raise BusiError(f"--where {where!r}: not an MLflow search filter ({str(err).splitlines()[0]})") from None
    runs = [run for run in runs if REPORT_TAG not in run.data.tags]
    # A run killed (SIGKILL) while a re-evaluation was added to it stays RUNNING, but keeps its last complete
    # evaluation: the model URI tag is set only once a model is fully logged.
    finished = [run for run in runs if run.info.status == "FINISHED" or MODEL_URI_TAG in run.data.tags]
    if not finished:
        raise BusiError(f"MLflow experiment {experiment!r} ({shown_uri(uri)}) has no finished runs"
                        + (f" matching {where!r}" if where else ": train a model first"))
    return finished, len(runs) - len(finished), shown_uri(uri)


def log_report(experiment: str, files: list[Path]) -> str:
    """The report's files as artifacts of the experiment's `study-report` run: made by the first report, updated
    by every later one (files of the same name replaced); tagged so that reports leave it out. Returns its id."""
    client = mlflow.MlflowClient(tracking_uri())
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 'study'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        experiment_id, run_name="study-report", tags={REPORT_TAG: "study"}).info.run_id
    for file in files:
        client.log_artifact(run_id, str(file))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def load_table(run_id: str, name: str) -> pd.DataFrame | None:
    """A table a run logged with log_table (pandas' split layout), or None where it has none."""
    client = mlflow.MlflowClient(tracking_uri())
    if name not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="busi-table-") as tmp:
        table = json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())
    return pd.DataFrame(table["data"], columns=table["columns"])


def metric_history(run_id: str, column: str) -> dict[int, float]:
    """{epoch: value} of a history column (`val_loss`); a resumed run may have logged an epoch twice: its last
    value counts."""
    client = mlflow.MlflowClient(tracking_uri())
    logged = client.get_metric_history(run_id, curve_name(column))
    metrics = sorted(logged, key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in metrics}
