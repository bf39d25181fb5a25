"""The common layout of public and in-house ultrasound sets: a folder of images, a folder of masks paired with
them by a name rule, and a CSV of labels (params: dataset, or an external dataset; busi.config.DatasetParams).

    <root>/labels.csv          id,label[,case][,any other column]
    <root>/images/{id}.png     the image_name rule
    <root>/masks/{id}.png      the mask_name rule (e.g. mask_{id}.png); a normal image may have none

Every row names an image that exists; every image file that fits the name rule has a row; an id is a plain file
name part (no path separators), unique. Any problem is one BusiError line naming the file (and CSV line).
"""

import csv
import re
from pathlib import Path

from busi import CLASSES, BusiError
from busi.config import DatasetParams
from busi.data.images import Case

MAX_LABELS_BYTES = 50 * 2**20  # a labels CSV of 100,000 images is a few MB
FOLDER = "dataset"  # where fetch puts it inside data/raw
SAFE_ID = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")


def find_root(folder: Path, dataset: DatasetParams) -> Path:
    """The folder holding the labels CSV: `folder` itself or one folder below it (an archive's top folder)."""
    folder = Path(folder)
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        if (candidate / dataset.labels).is_file():
            return candidate
    raise BusiError(f"{folder}: no {dataset.labels} in it or in a folder just below it "
                    "(params: dataset.labels, for the folders layout)")


def scan(root: Path, dataset: DatasetParams) -> list[Case]:
    """Every labelled image with its mask, checked against the files present."""
    root = Path(root)
    rows = read_labels(root / dataset.labels, dataset)
    images_dir, masks_dir = root / dataset.images, root / dataset.masks
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise BusiError(f"{folder}: the {what} folder is missing (params: dataset.{what})")
    cases = []
    for line, image_id, label, group in rows:
        image = images_dir / dataset.image_name.replace("{id}", image_id)
        if not image.is_file():
            raise BusiError(f"{root / dataset.labels}: line {line}: no image {image.relative_to(root)} for id "
                            f"{image_id!r}")
        mask = masks_dir / dataset.mask_name.replace("{id}", image_id)
        if not mask.is_file() and label != "normal":
            raise BusiError(f"{image}: no mask {mask.relative_to(root)} (only a normal image may have none)")
        cases.append(Case(image_id, label, image, (mask,) if mask.is_file() else (), group))
    known = {path for case in cases for path in (case.image, *case.masks)}
    for folder, rule in ((images_dir, dataset.image_name), (masks_dir, dataset.mask_name)):
        pattern = re.compile("^" + re.escape(rule).replace(re.escape("{id}"), ".+") + "$")
        for path in sorted(folder.iterdir()):
            if pattern.match(path.name) and path not in known:
                raise BusiError(f"{path}: not in {dataset.labels} (every image and mask needs its label row)")
    if not cases:
        raise BusiError(f"{root / dataset.labels}: no images listed")
    return cases


def read_labels(path: Path, dataset: DatasetParams) -> list[tuple[int, str, str, str]]:
    """(line, id, label, case) per row of the labels CSV; the id, label and case columns as params name them."""
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise BusiError(f"{path}: larger than the limit of {MAX_LABELS_BYTES // 2**20} MiB for a labels CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            wanted = [dataset.id_column, dataset.label_column] + ([dataset.case_column] if dataset.case_column else [])
            for column, name in zip(wanted, ("id", "label", "case"), strict=False):
                if column not in columns:
                    raise BusiError(f"{path}: no column {column!r} (params: dataset.{name}_column; the CSV has "
                                    f"{', '.join(map(repr, columns)) or 'no header'})")
            rows, seen = [], {}
            for line, row in enumerate(reader, start=2):
                image_id = (row[dataset.id_column] or "").strip()
                label = (row[dataset.label_column] or "").strip().lower()
                if not SAFE_ID.match(image_id) or image_id in (".", ".."):
                    raise BusiError(f"{path}: line {line}: id {image_id!r} is not a plain file name part")
                if image_id in seen:
                    raise BusiError(f"{path}: line {line}: id {image_id!r} already on line {seen[image_id]}")
                if label not in CLASSES:
                    raise BusiError(f"{path}: line {line}: label {label!r} is not one of {', '.join(CLASSES)}")
                seen[image_id] = line
                group = (row[dataset.case_column] or "").strip() if dataset.case_column else ""
                rows.append((line, image_id, label, group))
    except UnicodeDecodeError:
        raise BusiError(f"{path}: not a UTF-8 text file (expected a CSV of labels)") from None
    except csv.Error as err:
        raise BusiError(f"{path}: not a readable CSV ({err})") from None
    return rows
