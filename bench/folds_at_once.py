"""Every fold of a cross-validation (or of a grid of them) at once on one machine, without Ray: one process per
(configuration, fold), each with its share of the cores (OMP_NUM_THREADS), all sharing the GPU. For a GPU
machine that Ray cannot travel to (bench/device_cv.sh); on a cluster, RAY_ADDRESS and `busi cross-validate` do this.

    PYTHONPATH=src python bench/folds_at_once.py --out screen [--grid FILE] [--jobs N]
    PYTHONPATH=src python -m busi cross-validate --out screen [--grid FILE]

The folds land where `busi cross-validate` puts them, trained as it trains them (busi.training.train on the
fold's arrays), so the same command with the same --out then only scores them: it skips every fold already
trained with the same params. Each fold process tracks its training in its own sqlite store beside the fold
(`fold-K/mlflow.db`), since several processes writing one sqlite file lock each other out; the cross-validation's
parent run, its OOF metrics and the fold ensemble go to the usual store when cross-validate scores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from busi.config import Params, load_grid, load_params
from busi.data.arrays import load_split
from busi.distributed import fold_arrays, write_arrays
from busi.stages.cross_validate import concatenate, folds_of
from busi.tracking import TrainingRun
from busi.training import is_trained, train


def train_fold(args) -> None:
    """One fold, in this process (started by main with its environment): its arrays written where train() reads
    them, then trained into the fold's folder."""
    params = Params.model_validate(json.loads((args.fold_dir / "params.json").read_text()))
    pool = concatenate(load_split(args.data, "train"), load_split(args.data, "val"))
    fold_of = folds_of(pool["ids"], args.splits)
    with tempfile.TemporaryDirectory(prefix="busi-fold-") as tmp:
        write_arrays(Path(tmp), fold_arrays(pool, fold_of != args.fold))
        train(Path(tmp), params, args.fold_dir, args.fold_dir / "train.json", args.fold_dir / "history.csv",
              TrainingRun(params, suffix=f"-fold{args.fold}"))


def run_fold(args, config: Params, fold: int, fold_dir: Path, threads: int) -> int:
    """A fresh interpreter per fold, its thread count set before torch starts (as `dvc queue` workers get it): a
    multiprocessing child would inherit the parent's start-up and re-import everything in each data worker.
    Returns its exit status."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    (fold_dir / "params.json").write_text(json.dumps(config.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "MLFLOW_TRACKING_URI": f"sqlite:///{(fold_dir / 'mlflow.db').resolve()}"}
    command = [sys.executable, __file__, "--data", str(args.data), "--splits", str(args.splits),
               "--fold", str(fold), "--fold-dir", str(fold_dir)]
    with (fold_dir / "log.txt").open("a") as log:  # one log per fold, not interleaved
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="as busi cross-validate's --out")
    parser.add_argument("--grid", type=Path, help="as busi cross-validate's --grid")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    parser.add_argument("--jobs", type=int, default=0, help="folds training at once (default: all of them)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per fold (default: the cores / jobs)")
    parser.add_argument("--fold", type=int, help=argparse.SUPPRESS)  # a child: train this fold, into --fold-dir
    parser.add_argument("--fold-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fold is not None:
        return train_fold(args)
    if args.out is None:
        parser.error("--out is required")

    params = load_params(args.params)
    configs = load_grid(args.grid, params) if args.grid else {"": params}
    pool = concatenate(load_split(args.data, "train"), load_split(args.data, "val"))
    fold_of = folds_of(pool["ids"], args.splits)
    jobs = [(config, fold, args.out / name / "folds" / f"fold-{fold}")
            for name, config in configs.items() for fold in sorted(set(fold_of.tolist()))]
    jobs = [job for job in jobs if not is_trained(job[2], job[0])]
    at_once = args.jobs or len(jobs)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // max(1, min(at_once, len(jobs))))
    print(f"{len(jobs)} folds to train, {at_once} at once, {threads} thread(s) each", flush=True)

    started, failed = time.perf_counter(), []

    def fold_done(config: Params, fold: int, fold_dir: Path) -> None:
        code = run_fold(args, config, fold, fold_dir, threads)
        failed.extend([fold_dir] if code else [])
        status = "done" if code == 0 else f"FAILED (exit {code}; {fold_dir}/log.txt)"
        print(f"{fold_dir}: {status} at {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    with ThreadPoolExecutor(max(1, at_once)) as pool_of_folds:  # threads that each wait on one fold's process
        list(pool_of_folds.map(lambda job: fold_done(*job), jobs))
    print(f"{len(jobs) - len(failed)} of {len(jobs)} folds trained in {(time.perf_counter() - started) / 60:.1f} min")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
