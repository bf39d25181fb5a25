"""Benchmark: training images/s per encoder at 224 px, bf16 against fp32, and the ratio of the project's
training step (busi.training.run_epoch: augmentation, data loader, loss, metrics) to a bare PyTorch loop over
the same model and batches.

    python bench/train_speed.py [--encoders vgg16 vgg19 resnet50 dpn68] [--size 224] [--batches 3]

Figures, not pass/fail (target: ratio >= 0.9). Synthetic images: speed does not depend on content.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from busi.config import load_params  # noqa: E402
from busi.data.arrays import SegmentationDataset, train_transform  # noqa: E402
from busi.model.network import build_model  # noqa: E402
from busi.training import SegmentationLoss, run_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bare_loop(model, loss_fn, batches, dtype) -> float:
    """The reference: forward, loss, backward, step on ready-made tensors; returns images/s."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    started, seen = time.perf_counter(), 0
    for images, masks, labels in batches:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            mask_logits, class_logits = model(images)
            loss = loss_fn(mask_logits, class_logits, masks, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(images)
    return seen / (time.perf_counter() - started)


def measure(encoder: str, size: int, batch_size: int, n_batches: int, dtype) -> dict:
    params = load_params(REPO / "params.yaml")
    rng = np.random.default_rng(0)
    n = batch_size * (n_batches + 1)
    arrays = {"images": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
              "masks": (rng.random((n, size, size)) > 0.8).astype(np.uint8), "labels": np.arange(n) % 3}
    dataset = SegmentationDataset(arrays, train_transform(params.augment, seed=0))
    loss_fn = SegmentationLoss(torch.ones(3), params.train.class_loss_weight)
    model = build_model(params.model.model_copy(update={"encoder": encoder})).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)

    # Project: the real epoch function; the first batch warms up (allocations, oneDNN kernels).
    warm = DataLoader(torch.utils.data.Subset(dataset, range(batch_size)), batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run_epoch(model, warm, loss_fn, torch.device("cpu"), dtype, optimizer)
    timed = DataLoader(torch.utils.data.Subset(dataset, range(batch_size, n)), batch_size=batch_size)
    project = run_epoch(model, timed, loss_fn, torch.device("cpu"), dtype, optimizer)["images_per_s"]

    batches = [next(iter(DataLoader(dataset, batch_size=batch_size)))] * (n_batches + 1)
    bare_loop(reference, loss_fn, batches[:1], dtype)
    bare = bare_loop(reference, loss_fn, batches[1:], dtype)
    return {"project_images_per_s": round(project, 2), "bare_images_per_s": round(bare, 2),
            "ratio": round(project / bare, 3)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["vgg16", "vgg19", "resnet50", "dpn68"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    return run(args.encoders, args.size, args.batch_size, args.batches)


def run(encoders: list[str], size: int = 224, batch_size: int = 8, batches: int = 3) -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results = {}
    print(f"{'encoder':>10} {'precision':>9} {'project img/s':>14} {'bare img/s':>11} {'ratio':>6}")
    for encoder in encoders:
        for name, dtype in [("fp32", None), ("bf16", torch.bfloat16)]:
            row = measure(encoder, size, batch_size, batches, dtype)
            results[f"{encoder}/{name}"] = row
            print(f"{encoder:>10} {name:>9} {row['project_images_per_s']:>14.2f} {row['bare_images_per_s']:>11.2f} "
                  f"{row['ratio']:>6.2f}", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
