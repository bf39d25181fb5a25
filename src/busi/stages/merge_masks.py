"""Stage merge_masks: one binary mask per image (0/255, the image's own size), the logical OR of all
its mask files. An image without a mask file (normal) gets an all-zero mask."""

from pathlib import Path

import numpy as np
from PIL import Image

from busi import BusiError
from busi.data.cases import read_cases
from busi.data.images import read_mask
from busi.files import atomic_dir


def merge_masks(raw_dir: Path, out_dir: Path) -> int:
    """Write `<out_dir>/<image_id>.png` for every image; returns the number written."""
    cases = read_cases(raw_dir)
    with atomic_dir(out_dir) as tmp:
        for case in cases:
            with Image.open(case.image) as image:  # fetch decoded it already; the size is enough here
                width, height = image.size
            merged = np.zeros((height, width), dtype=bool)
            for path in case.masks:
                mask = read_mask(path)
                if mask.shape != merged.shape:
                    raise BusiError(
                        f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is {width}x{height}"
                    )
                merged |= mask
            Image.fromarray(merged.astype(np.uint8) * 255).save(tmp / f"{case.image_id}.png")
    return len(cases)


def run(args, params) -> str:
    return f"{merge_masks(args.raw, args.out)} merged masks in {args.out}"
