"""Every speed benchmark of the project in one command, written to metrics/bench.json:

    python bench/run_all.py [--archive ../shared/data/busi/Dataset_BUSI_with_GT.zip]

the data stages' wall time and a no-op `dvc repro` (data_stages.py); training images/s per study encoder at
224 px, bf16 and fp32, and the ratio to a bare PyTorch loop (train_speed.py); inference latency per image at
224 px (batch 1, fp32, as `predict` runs); peak memory. Figures, not pass/fail.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import data_stages  # noqa: E402
import train_speed  # noqa: E402

from busi.config import NetworkConfig, load_params  # noqa: E402
from busi.model.network import build_model  # noqa: E402
from busi.model.predictor import Predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENCODERS = ["vgg16", "vgg19", "resnet50", "dpn68"]


def inference_latency(encoder: str, size: int = 224, repeats: int = 5) -> float:
    """Median seconds to predict one image (after a warm-up call)."""
    params = load_params(REPO / "params.yaml").model.model_copy(update={"encoder": encoder})
    model = build_model(params).to(memory_format=torch.channels_last).eval()
    predictor = Predictor([model], [NetworkConfig(model=params, image_size=size)])
    image = np.random.default_rng(0).integers(0, 256, (1, size, size), dtype=np.uint8)
    predictor.probabilities(image)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.probabilities(image)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=REPO.parent / "shared/data/busi/Dataset_BUSI_with_GT.zip")
    parser.add_argument("--out", type=Path, default=REPO / "metrics/bench.json")
    args = parser.parse_args()
    figures = {"machine": {"cpu_cores": len(os.sched_getaffinity(0)), "processor": platform.processor(),
                           "torch": torch.__version__, "bf16_native": torch.ops.mkldnn._is_mkldnn_bf16_supported()},
               "data": data_stages.run(args.archive),
               "train_224px": train_speed.run(ENCODERS),
               "inference_ms_per_image_224px": {e: round(1000 * inference_latency(e), 1) for e in ENCODERS}}
    figures["peak_memory_mib"] = {  # ru_maxrss is in KiB on Linux
        "benchmark_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "pipeline_stages": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures["inference_ms_per_image_224px"]), json.dumps(figures["peak_memory_mib"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
