"""Image and mask files as the pipeline reads them, whatever the dataset's layout: decoding with a pixel limit,
8-bit grayscale, the mask rule; and `Case`, one image with its masks, label and group."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from busi import BusiError

MAX_PIXELS = 50_000_000  # per image (BUSI's largest is 0.75 M): a header claiming more is refused, not decoded
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL refuses twice as many at open(); decode() refuses more than this


@dataclass(frozen=True)
class Case:
    image_id: str  # e.g. "benign (12)": unique across classes
    label: str
    image: Path
    masks: tuple[Path, ...]  # lesion masks, merged by logical OR (none: no lesion)
    group: str = ""  # patient or case, where the dataset says (its images never straddle two splits)


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
