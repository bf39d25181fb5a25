"""A dataset as a list of cases (image, masks, label, group), whatever its layout: the layouts' dispatch, the
index that fetch writes beside the data (data/raw/cases.csv) and every later stage reads, and the reading of one
case with the checks every stage relies on.

Layouts: busi.data.layouts (LAYOUTS); params: dataset.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from busi import BusiError
from busi.config import DatasetParams
from busi.data.images import Case, binarize_mask, mask_levels, read_gray
from busi.data.layouts import LAYOUTS

INDEX = "cases.csv"
MANIFEST = "manifest.csv"  # every file fetch wrote, with its size and hash


def layout(dataset: DatasetParams):
    """The layout module `dataset.layout` names (its FOLDER: where fetch puts the data inside data/raw)."""
    if dataset.layout not in LAYOUTS:
        raise BusiError(f"dataset.layout: {dataset.layout!r} is not a layout (layouts: {', '.join(LAYOUTS)})")
    return LAYOUTS[dataset.layout]


def find_root(folder: Path, dataset: DatasetParams) -> Path:
    """The dataset's root inside a source folder (or an unpacked archive)."""
    return layout(dataset).find_root(folder, dataset)


def scan(root: Path, dataset: DatasetParams) -> list[Case]:
    return layout(dataset).scan(root, dataset)


def write_index(cases: list[Case], base: Path, path: Path) -> None:
    """One row per image, paths relative to `base` (the folder the index is in); masks as a JSON list."""
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "label", "group", "image", "masks"])
        for case in cases:
            writer.writerow([case.image_id, case.label, case.group, case.image.relative_to(base).as_posix(),
                             json.dumps([mask.relative_to(base).as_posix() for mask in case.masks])])


def read_cases(raw_dir: Path) -> list[Case]:
    """The cases of fetch's output (its index), or of a BUSI-layout folder given directly."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / INDEX).is_file():
        return LAYOUTS["busi"].scan(LAYOUTS["busi"].find_root(raw_dir))
    with (raw_dir / INDEX).open(newline="") as f:
        return [Case(row["image_id"], row["label"], raw_dir / row["image"],
                     tuple(raw_dir / mask for mask in json.loads(row["masks"])), row["group"])
                for row in csv.DictReader(f)]


def read_originals(raw_dir: Path, ids) -> list[np.ndarray]:
    """The images `ids` of fetch's output as 8-bit grayscale at their own size, as predict reads a file: what
    the crop network is cut from."""
    image_of = {case.image_id: case.image for case in read_cases(raw_dir)}
    missing = [str(i) for i in ids if str(i) not in image_of]
    if missing:
        raise BusiError(f"{raw_dir}: {len(missing)} image(s) of the split are not there (e.g. {missing[0]!r}); "
                        "run `dvc repro fetch`")
    return [read_gray(image_of[str(i)]) for i in ids]


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The image as 8-bit grayscale and its lesion mask (the OR of its mask files, by the mask rule), checked:
    the files decode, within the pixel limit, and every mask has its image's size. A mask that is not 0/255 is
    thresholded at its midpoint, with a warning."""
    image = read_gray(case.image)
    merged = np.zeros(image.shape, dtype=bool)
    for path in case.masks:
        levels = mask_levels(path)
        if levels.shape != image.shape:
            raise BusiError(f"{path}: mask is {levels.shape[1]}x{levels.shape[0]}, its image is "
                            f"{image.shape[1]}x{image.shape[0]}")
        mask, threshold = binarize_mask(levels)
        if threshold is not None:
            print(f"warning: {path}: mask values are not 0/255: lesion where above {threshold}", file=sys.stderr)
        merged |= mask
    return image, merged
