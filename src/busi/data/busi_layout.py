"""The BUSI folder layout (Kaggle's `Dataset_BUSI_with_GT/<class>/<id>.png` + `<id>_mask[_N].png`)
and the integrity checks every stage relies on."""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from busi import CLASSES, BusiError

DATASET_DIR = "Dataset_BUSI_with_GT"
MAX_PIXELS = 50_000_000  # per image (BUSI's largest is 0.75 M): a header claiming more is refused, not decoded
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL refuses twice as many at open(); decode() refuses more than this
_MASK_NAME = re.compile(r"^(?P<image_id>.+)_mask(_\d+)?$")


@dataclass(frozen=True)
class Case:
    image_id: str  # e.g. "benign (12)": unique across classes
    label: str
    image: Path
    masks: tuple[Path, ...]  # lesion masks, merged by logical OR (none: no lesion)
    group: str = ""  # patient or case, where the dataset says (its images never straddle two splits)


def find_root(folder: Path) -> Path:
    """The folder that holds the class folders: `folder` itself or the one `Dataset_BUSI_with_GT` below it."""
    folder = Path(folder)
    if any((folder / name).is_dir() for name in CLASSES):
        return folder
    candidates = sorted(p for p in folder.rglob(DATASET_DIR) if p.is_dir())
    if not candidates:
        raise BusiError(f"{folder}: no {DATASET_DIR}/ or benign/, malignant/, normal/ folders inside")
    return candidates[0]


def scan(root: Path) -> list[Case]:
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


def open_image(path: Path) -> Image.Image:
    """Decode a PNG fully (a truncated file fails here, not later in training)."""
    return decode(path, path)


def decode(source, name) -> Image.Image:
    """Decode an image file or file object fully; any failure (not an image, truncated, more than MAX_PIXELS
    pixels) is one BusiError naming `name`."""
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS: refused below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        if image.width * image.height > MAX_PIXELS:  # read from the header, before any pixel is decoded
            raise BusiError(f"{name}: image of {image.width}x{image.height} is larger than the limit of "
                            f"{MAX_PIXELS:,} pixels")
        image.load()
    except Image.DecompressionBombError:
        raise BusiError(f"{name}: image larger than the limit of {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BusiError(f"{name}: cannot decode image ({err})") from None
    return image


def read_gray(path: Path) -> np.ndarray:
    """An image file as 8-bit grayscale, whatever its mode (L, RGB, RGBA, P, and 16-bit I;16 / I)."""
    return to_gray(open_image(path))


def decode_gray(source, name: str) -> np.ndarray:
    """An image file object as 8-bit grayscale, exactly as read_gray reads a file (serving uses it)."""
    return to_gray(decode(source, name))


def to_gray(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I"):  # convert("L") would clip every 16-bit value above 255: scale instead
        return (np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("L"))


def mask_levels(path: Path) -> np.ndarray:
    """A mask file's gray levels (RGB and RGBA as their luminance; 1-bit as 0/255), before any rule applies."""
    image = open_image(path)
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB")
    return np.asarray(image.convert("L"))


def binarize_mask(levels: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The mask rule: 0/255 masks (BUSI's own) are lesion where non-zero. Any other set of values is thresholded
    at the midpoint of the lowest and highest value present (lesion above it): a mask stored as 20/198 is not
    all lesion. Returns the mask and the threshold used when the rule was not the plain one (None otherwise)."""
    values = np.unique(levels)
    if set(values.tolist()) <= {0, 255}:
        return levels > 0, None
    threshold = (int(values[0]) + int(values[-1])) // 2
    return levels > threshold, threshold


def read_mask(path: Path) -> np.ndarray:
    """A lesion mask as bool, by the rule of binarize_mask (masks come as 1-bit, L, RGB and RGBA)."""
    return binarize_mask(mask_levels(path))[0]
