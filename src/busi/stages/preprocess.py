"""Stage preprocess: grayscale, resized to image_size (bilinear images, nearest masks, as the study did),
one compact .npz per split so that training never decodes a PNG."""

import csv
from pathlib import Path

import cv2
import numpy as np

from busi import CLASSES, SPLITS, BusiError
from busi.data.cases import read_cases
from busi.data.images import read_gray
from busi.files import atomic_dir


def preprocess(raw_dir: Path, masks_dir: Path, splits_csv: Path, image_size: int, out_dir: Path) -> dict:
    """Write `<out_dir>/<split>.npz` with images, masks, labels, ids, groups (the scan's copy group of
    splits.csv: the bootstrap draws them whole) and original sizes; returns counts."""
    image_of = {case.image_id: case.image for case in read_cases(raw_dir)}
    with Path(splits_csv).open(newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            chosen = [row for row in rows if row["split"] == split]
            images, masks, sizes = [], [], []
            for row in chosen:
                if row["image_id"] not in image_of:
                    raise BusiError(f"{splits_csv}: {row['image_id']!r} is not in {raw_dir}")
                image = read_gray(image_of[row["image_id"]])
                mask = cv2.imread(str(Path(masks_dir) / f"{row['image_id']}.png"), cv2.IMREAD_GRAYSCALE)
                if mask is None:
                    raise BusiError(f"{masks_dir}/{row['image_id']}.png: merged mask missing or unreadable")
                sizes.append(image.shape)
                images.append(cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_LINEAR))
                masks.append(cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_NEAREST) > 0)
            np.savez(
                tmp / f"{split}.npz",
                images=np.stack(images) if images else np.zeros((0, image_size, image_size), np.uint8),
                masks=np.stack(masks).astype(np.uint8) if masks else np.zeros((0, image_size, image_size), np.uint8),
                labels=np.array([CLASSES.index(row["label"]) for row in chosen], dtype=np.int64),
                ids=np.array([row["image_id"] for row in chosen], dtype=str),
                groups=np.array([row["group"] for row in chosen], dtype=str),
                sizes=np.array(sizes, dtype=np.int32).reshape(-1, 2),  # original (height, width)
            )
            counts[split] = len(chosen)
    return counts


def run(args, params) -> str:
    counts = preprocess(args.raw, args.masks, args.splits, params.preprocess.image_size, args.out)
    return ", ".join(f"{s} {n}" for s, n in counts.items()) + f" at {params.preprocess.image_size} px"
