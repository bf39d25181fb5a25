"""Lesion segmentation and classification on breast ultrasound (BUSI), as a DVC + MLflow pipeline."""

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CLASSES = ("benign", "malignant", "normal")  # label index = position in this tuple
SPLITS = ("train", "val", "test")


class BusiError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


def thread_count() -> int:
    """The threads a training uses: OMP_NUM_THREADS when it is set (give each of N parallel workers its share:
    `OMP_NUM_THREADS=1 dvc queue start -j 2` on 2 cores), else every core this process may use (its CPU
    affinity, not the machine's count)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast type a training on `device` runs in for params' `precision` (auto | fp32 | bf16): auto is bf16
    where the hardware runs it natively (CPU with AVX512-BF16/AMX, CUDA), else fp32 (None: no autocast)."""
    import torch  # here: the CLI imports this package before it needs torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
