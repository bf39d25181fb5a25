"""Lesion segmentation and classification on breast ultrasound (BUSI), as a DVC + MLflow pipeline."""

import os

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
