"""Benchmark: N trainings at once (as `dvc queue start -j N` runs them), each given its share of the cores
through OMP_NUM_THREADS, on the preprocessed arrays; per-worker and total training images/s for N = 1, 2, 4.

    PYTHONPATH=src python bench/parallel_scaling.py [--data data/processed] [--workers 1 2 4] [--images 96]

Runs on CUDA where present (every worker on the one GPU), else on the CPU. The workers share one fresh MLflow
sqlite store, as queued experiments share the repository's. Figures, not pass/fail.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(data: Path, workers: int, images: int, epochs: int) -> dict:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="busi-scaling-") as tmp:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["train"] |= {"epochs": epochs, "max_train_images": images, "patience": epochs}
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # + wheels
        env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": str(max(1, cores // workers)),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        started = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-m", "busi", "--params", f"{tmp}/params.yaml", "train",
                                       "--data", str(data), "--out", f"{tmp}/w{i}",
                                       "--metrics", f"{tmp}/w{i}/train.json", "--history", f"{tmp}/w{i}/h.csv"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(workers)]
        failed = [p.communicate()[1].strip().splitlines()[-1:] for p in processes if p.wait() != 0]
        wall = time.perf_counter() - started
        if failed:
            raise SystemExit(f"{len(failed)} of {workers} workers failed: {failed}")
        rates = []
        for i in range(workers):
            with open(f"{tmp}/w{i}/h.csv") as f:
                rows = list(csv.DictReader(f))
            rates.append(max(float(row["train_images_per_s"]) for row in rows))  # the warmed-up epoch
    return {"workers": workers, "threads_each": max(1, cores // workers), "per_worker_images_per_s":
            round(sum(rates) / workers, 2), "total_images_per_s": round(sum(rates), 2), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data/processed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=96, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{device}: {args.images} images per epoch, {args.epochs} epochs, the faster epoch counted")
    results = []
    for workers in args.workers:
        row = run(args.data, workers, args.images, args.epochs)
        results.append(row)
        print(f"{workers} worker(s) x {row['threads_each']} threads: {row['per_worker_images_per_s']:.1f} img/s "
              f"each, {row['total_images_per_s']:.1f} in total ({row['wall_s']:.0f} s wall)", flush=True)
    print(json.dumps({"device": device, "scaling": results}))


if __name__ == "__main__":
    main()
