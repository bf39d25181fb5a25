"""The metrics files an evaluation writes (evaluate, evaluate-external): the headline DVC tabulates, and every
metric beside it."""

import json
from pathlib import Path

from busi.evaluation.metrics import METRICS
from busi.files import atomic_file


def write_metrics(path: Path, metrics: dict) -> None:
    """The headline (the number of images and the top-level metrics of METRICS) to `path`, a DVC metrics
    file that `dvc metrics show` and `dvc exp show` tabulate in one line; everything (per class, confusion,
    intervals, post-processing decisions, the other metrics) to `<stem>_detail.json` beside it, which DVC does
    not tabulate."""
    top_level = ["images", *(metric.key for metric in METRICS if "." not in metric.key)]
    headline = {key: metrics[key] for key in top_level if key in metrics}
    for target, content in ((Path(path), headline), (detail_path(path), metrics)):
        with atomic_file(target) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")


def detail_path(path: Path) -> Path:
    return Path(path).with_name(f"{Path(path).stem}_detail.json")
