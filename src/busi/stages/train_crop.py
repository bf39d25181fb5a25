"""Stage train_crop (dvc.yaml): the crop network (busi.model.crop) on the training split's lesions, cut from the
original images around their reference masks; busi.crop_training trains it. Independent of the U-Net: the
evaluate stage puts the two together and decides on validation how much the crop network's say weighs."""

import csv
import json
from pathlib import Path

import torch

from busi import CLASSES, BusiError, thread_count
from busi.config import Params
from busi.crop_training import train_crop_network
from busi.data.arrays import read_references
from busi.data.cases import read_originals
from busi.files import atomic_file
from busi.model.crop import save_crop_checkpoint


def train_crop(raw_dir: Path, masks_dir: Path, splits_csv: Path, params: Params, out: Path, metrics: Path) -> dict:
    """Write the crop network to `out` (a checkpoint: weights + configuration) and its summary to `metrics`."""
    torch.set_num_threads(thread_count())
    try:
        with Path(splits_csv).open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["split"] == "train"]
    except (OSError, KeyError) as err:
        raise BusiError(f"{splits_csv}: cannot read the split ({type(err).__name__}: {err}); "
                        "run `dvc repro split`") from None
    ids = [row["image_id"] for row in rows]
    images = read_originals(raw_dir, ids)
    references = read_references(masks_dir, {"ids": ids, "sizes": [image.shape for image in images]})
    labels = [CLASSES.index(row["label"]) for row in rows]
    print(f"train_crop: {len(ids)} training images, from {raw_dir}", flush=True)
    classifier, summary = train_crop_network(images, references, labels, params.crop)
    save_crop_checkpoint(out, classifier, summary=summary)
    with atomic_file(metrics) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args, params: Params) -> str:
    summary = train_crop(args.raw, args.masks, args.splits, params, args.out, args.metrics)
    return (f"{summary['images']} lesion crops ({summary['benign']} benign, {summary['malignant']} malignant), "
            f"{summary['epochs']} epochs, last loss {summary['loss']:.3f}; written to {args.out}")
