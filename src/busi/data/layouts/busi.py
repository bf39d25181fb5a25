"""The BUSI layout (Kaggle's `Dataset_BUSI_with_GT/<class>/<id>.png` + `<id>_mask[_N].png`): class folders,
masks beside their images, every image with at least one mask."""

import re
from pathlib import Path

from busi import CLASSES, BusiError
from busi.config import DatasetParams
from busi.data.images import Case

FOLDER = DATASET_DIR = "Dataset_BUSI_with_GT"  # also where fetch puts it inside data/raw
_MASK_NAME = re.compile(r"^(?P<image_id>.+)_mask(_\d+)?$")


def find_root(folder: Path, dataset: DatasetParams | None = None) -> Path:
    """The folder that holds the class folders: `folder` itself or the one `Dataset_BUSI_with_GT` below it."""
    folder = Path(folder)
    if any((folder / name).is_dir() for name in CLASSES):
        return folder
    candidates = sorted(p for p in folder.rglob(DATASET_DIR) if p.is_dir())
    if not candidates:
        raise BusiError(f"{folder}: no {DATASET_DIR}/ or benign/, malignant/, normal/ folders inside")
    return candidates[0]


def scan(root: Path, dataset: DatasetParams | None = None) -> list[Case]:
    """List every image with its masks; refuse unknown class folders, orphan masks and unmasked images."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if folder.name not in CLASSES:
            raise BusiError(f"{folder}: unknown class folder (expected {', '.join(CLASSES)})")
    cases = []
    for label in CLASSES:
        folder = root / label
        if not folder.is_dir():
            raise BusiError(f"{folder}: class folder missing")
        images, masks = {}, {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if path.suffix.lower() != ".png" or not path.is_file():
                raise BusiError(f"{path}: unexpected file (expected PNG images and masks only)")
            match = _MASK_NAME.match(path.stem)
            if match:
                masks.setdefault(match["image_id"], []).append(path)
            else:
                images[path.stem] = path
        for image_id, paths in masks.items():
            if image_id not in images:
                raise BusiError(f"{paths[0]}: mask without its image ({image_id}.png)")
        for image_id, path in images.items():
            if image_id not in masks:
                raise BusiError(f"{path}: image without any mask ({image_id}_mask.png)")
            cases.append(Case(image_id, label, path, tuple(sorted(masks[image_id]))))
    if not cases:
        raise BusiError(f"{root}: empty dataset, no images found")
    return cases
