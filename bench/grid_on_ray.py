"""Benchmark: one small grid (2 configurations x the split's folds) through `busi cross-validate --grid`, in
this process (no RAY_ADDRESS, the default) and as Ray tasks on a Ray started on this machine (RAY_ADDRESS=local,
one CPU thread per fold, two folds at once on 2 cores); wall seconds of each and their test metrics (the same
only at the same threads per fold: a Ray task has one thread, this process uses every core). The driver's
own work (out-of-fold predictions, ensembles, MLflow) is the same in both.

    PYTHONPATH=src python bench/grid_on_ray.py [--size 64] [--epochs 2] [--images 64]

Prepares the real archive ($BUSI_ARCHIVE, else ../shared/data/busi) at --size px in a temporary folder; each
fold trains on --images images for --epochs epochs (a proxy: the figures compare the two paths, not models).
Figures, not pass/fail.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def busi(*args: str, cwd: Path, env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "busi", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"busi {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="training images per fold")
    args = parser.parse_args()
    archive = os.environ.get("BUSI_ARCHIVE", str(REPO.parent / "shared/data/busi/Dataset_BUSI_with_GT.zip"))
    with tempfile.TemporaryDirectory(prefix="busi-grid-bench-") as tmp:
        work = Path(tmp)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["preprocess"]["image_size"] = args.size
        params["train"] |= {"epochs": args.epochs, "patience": args.epochs, "max_train_images": args.images}
        params["evaluate"]["bootstrap"] = 200
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (work / "grid.yaml").write_text("default: {}\nplain: {model.attention: null}\n")
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "BUSI_ARCHIVE": archive,
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        for stage in (["fetch"], ["merge-masks"], ["split"], ["preprocess"]):
            busi(*stage, cwd=work, env=env)
        folds = len(set(line.split(",")[-1] for line in (work / "data/splits.csv").read_text().splitlines()[1:]
                        if not line.endswith(",-1")))
        print(f"grid: 2 configurations x {folds} folds, {args.images} images x {args.epochs} epochs a fold, "
              f"{args.size} px, {len(os.sched_getaffinity(0))} cores")
        results = {}
        for name, extra in (("in-process", {}), ("ray-local", {"RAY_ADDRESS": "local"})):
            run_env = {**env, **extra, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/{name}.db"}
            started = time.perf_counter()
            busi("cross-validate", "--grid", "grid.yaml", "--out", name, cwd=work, env=run_env)
            wall = time.perf_counter() - started
            test = {config: json.loads((work / name / config / "test.json").read_text()) for config in ("default",
                                                                                                        "plain")}
            results[name] = wall
            print(f"{name:>11}: {wall:6.1f} s wall; test dice "
                  + ", ".join(f"{config} {t['dice']:.3f}" for config, t in test.items()), flush=True)
        print(f"ray-local / in-process: {results['ray-local'] / results['in-process']:.2f}x the wall time")


if __name__ == "__main__":
    main()
