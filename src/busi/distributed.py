"""Where the folds of a cross-validation train: in this process, one after the other, or as Ray tasks.

Ray's own convention decides: with RAY_ADDRESS set (`ray://…`, `host:port`, `auto`, or `local` for a Ray started
on this machine) every (configuration, fold) is one Ray task that asks for `cpus` CPU threads and a `gpus`
fraction of a GPU (so that several small trainings share one GPU); without it, the folds train here, in turn, as
they always did. What a worker needs travels with the task, not through a shared disk: the code as Ray's
`runtime_env` (the busi package of the driver's checkout, `py_modules`), the fold's arrays through Ray's object
store, the tracking server through MLFLOW_TRACKING_URI. A worker that dies is retried (MAX_RETRIES); the retry
resumes from the fold's last epoch when it lands on the same node (its checkpoint lives on that node's disk),
else the fold starts over, into the same MLflow run when the checkpoint is there. Each fold's MLflow run is
tagged with the Ray node, host and process it ran in.
"""

import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busi.config import Params
from busi.files import atomic_file
from busi.tracking import TrainingRun
from busi.training import train

MAX_RETRIES = 3  # a worker process or node that dies: Ray runs the task again
FOLD_FILES = ("best.pt", "train.json", "history.csv")  # what a fold hands back to the driver
# What a worker needs from the driver's environment (the tracking store and experiment; nothing else).
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
             "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS")


@dataclass
class FoldJob:
    """One fold of one configuration: train on `train` rows, validate on the others, into `out_dir`."""
    params: Params
    fold: int
    train_rows: np.ndarray  # boolean masks over the pool of train+val images
    parent_run_id: str
    run_suffix: str
    out_dir: Path


def on_ray() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def run_folds(jobs: list[FoldJob], pool: dict, cpus: float = 1, gpus: float = 0) -> None:
    """Train every job; each leaves best.pt, train.json and history.csv in its out_dir."""
    if not on_ray():
        for job in jobs:
            print(f"cross-validate: {job.out_dir.parent.parent.name}{job.run_suffix} ({(~job.train_rows).sum()} held "
                  f"out, {job.train_rows.sum()} to train)", flush=True)
            with tempfile.TemporaryDirectory(prefix="busi-fold-") as tmp:
                write_arrays(Path(tmp), fold_arrays(pool, job.train_rows))
                train(Path(tmp), job.params, job.out_dir, job.out_dir / "train.json", job.out_dir / "history.csv",
                      TrainingRun(job.params, job.parent_run_id, job.run_suffix, where_tags()))
        return
    import ray

    # The busi package of this checkout is the code every worker runs (Ray uploads it once per content).
    ray.init(runtime_env={"py_modules": [str(Path(__file__).parent)],
                          "env_vars": {key: os.environ[key] for key in FORWARDED if key in os.environ}},
             log_to_driver=True)
    try:
        task = ray.remote(train_fold_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES)
        # Each fold's arrays go to the object store once, shared by every configuration's task for that fold.
        folds = {}
        for job in jobs:
            if job.fold not in folds:
                folds[job.fold] = ray.put(fold_arrays(pool, job.train_rows))
        pending = {task.remote(job.params.model_dump(mode="json"), job.fold, job.parent_run_id, job.run_suffix,
                               folds[job.fold]): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            for name, content in ray.get(done[0]).items():  # a task that failed for good raises here
                with atomic_file(job.out_dir / name) as tmp:
                    tmp.write_bytes(content)
    finally:
        ray.shutdown()


def train_fold_task(params: dict, fold: int, parent_run_id: str, run_suffix: str, arrays: dict) -> dict[str, bytes]:
    """A Ray task: train one fold on this node and hand back its files. Its folder on this node is named by the
    parent run and fold, so a retry here after the worker died resumes from the last finished epoch."""
    work = Path(tempfile.gettempdir()) / "busi-ray-folds" / f"{parent_run_id}{run_suffix}"
    data, out = work / "data", work / "out"
    write_arrays(data, arrays)
    params = Params.model_validate(params)
    train(data, params, out, out / "train.json", out / "history.csv",
          TrainingRun(params, parent_run_id, run_suffix, where_tags()))
    files = {name: (out / name).read_bytes() for name in FOLD_FILES}
    shutil.rmtree(work, ignore_errors=True)
    return files


def where_tags() -> dict[str, str]:
    """Where a training ran: the host and process, and on Ray the node (busi.ray_node)."""
    tags = {"busi.host": socket.gethostname(), "busi.pid": str(os.getpid())}
    ray = sys.modules.get("ray")  # imported only on the Ray path
    if ray is not None and ray.is_initialized():
        tags["busi.ray_node"] = ray.get_runtime_context().get_node_id()
    return tags


def fold_arrays(pool: dict, train_rows: np.ndarray) -> dict[str, dict]:
    """A fold's training data as preprocess lays it out: {"train": arrays, "val": the held-out arrays}."""
    return {"train": subset(pool, train_rows), "val": subset(pool, ~train_rows)}


def write_arrays(folder: Path, splits: dict[str, dict]) -> None:
    """`<split>.npz` in `folder` for each split, as training reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        with atomic_file(folder / f"{split}.npz") as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)


def subset(arrays: dict, rows) -> dict:
    return {key: value[rows] for key, value in arrays.items()}
