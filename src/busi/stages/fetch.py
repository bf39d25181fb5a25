"""Stage fetch: the raw dataset, from a local file/folder (BUSI_ARCHIVE) or Kaggle, verified and written
atomically to data/raw: the data (data/raw/Dataset_BUSI_with_GT for BUSI's layout, data/raw/dataset for the
folders layout; params: dataset), a manifest of every file, and the index of the cases every later stage reads
(cases.csv: id, label, group, image, masks).

Everything a later stage relies on is checked here, before the previous data/raw is replaced: the layout, every
PNG decodes and is within the pixel limit, every mask has its image's size, mask values (any other than 0/255
are thresholded at their midpoint, with a warning). Zip archives are capped in members and unpacked size, and
extracted only inside the target; a source folder's symbolic links are refused. Errors name the file as it is
in the user's archive or folder.
"""

import csv
import shutil
import socket
import sys
from pathlib import Path

import numpy as np

from busi import BusiError
from busi.config import DatasetParams
from busi.data.archive import KAGGLE_DATASET, archive_path, file_sha256, refuse_links, safe_extract
from busi.data.cases import INDEX, MANIFEST, find_root, layout, scan, write_index
from busi.data.images import binarize_mask, mask_levels, open_image
from busi.files import atomic_dir

KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"


def fetch(out_dir: Path, dataset: DatasetParams | None = None) -> int:
    """Fetch, verify and place the dataset (`dataset`: its layout; BUSI's by default) in `out_dir`; returns the
    number of images."""
    dataset = dataset or DatasetParams()
    source = archive_path() or download_from_kaggle(dataset)
    folder = layout(dataset).FOLDER
    with atomic_dir(out_dir) as tmp:
        if source.is_dir():
            root = find_root(source, dataset)
            refuse_links(root)
            shutil.copytree(root, tmp / folder)
            shown = f"{root}/"
        else:
            unpacked = tmp / ".unpacked"
            safe_extract(source, unpacked)
            try:
                root = find_root(unpacked, dataset)
            except BusiError as err:
                raise BusiError(f"{source}: {str(err).split(': ', 1)[1]}") from None
            shown = f"{source}: {root.relative_to(unpacked).as_posix()}/".replace(": ./", ": ")
            root.rename(tmp / folder)
            shutil.rmtree(unpacked, ignore_errors=True)
        try:  # errors name the member of the user's archive, not the temporary folder
            cases = scan(tmp / folder, dataset)
            write_manifest(tmp, tmp / MANIFEST, cases, shown, folder)
            write_index(cases, tmp, tmp / INDEX)
        except BusiError as err:
            raise BusiError(str(err).replace(f"{tmp / folder}/", shown)) from None
    return len(cases)


def download_from_kaggle(dataset: DatasetParams) -> Path:
    """Kaggle's public copy through kagglehub (no credentials needed); fails fast when offline."""
    if dataset.layout != "busi":
        raise BusiError(f"params: dataset.layout is {dataset.layout}: set BUSI_ARCHIVE to your dataset's folder or "
                        ".zip (Kaggle's copy is BUSI, in the busi layout)")
    try:
        socket.create_connection(("www.kaggle.com", 443), timeout=5).close()
    except OSError as err:
        raise BusiError(
            f"cannot reach Kaggle ({err}); download the archive from {KAGGLE_URL} "
            "and run with BUSI_ARCHIVE=/path/to/archive.zip (or the extracted folder)"
        ) from None
    import kagglehub  # imported late: it is slow to import and only needed online

    return Path(kagglehub.dataset_download(KAGGLE_DATASET))


def write_manifest(base: Path, manifest: Path, cases, shown: str, folder: str) -> None:
    """One row per PNG: path, sha256, size, width, height, mode, and for a mask its gray levels. Decoding every
    file verifies it; every mask must have its image's size; masks that are not 0/255 get a warning."""
    rows = []
    for case in cases:
        image = open_image(case.image)
        rows.append(row(base, case.image, image, ""))
        for path in case.masks:
            levels = mask_levels(path)
            if levels.shape != (image.height, image.width):
                raise BusiError(f"{path}: mask is {levels.shape[1]}x{levels.shape[0]}, its image is "
                                f"{image.width}x{image.height}")
            values = np.unique(levels)
            _, threshold = binarize_mask(levels)
            if threshold is not None:
                shown_path = str(path).replace(f"{base / folder}/", shown)
                print(f"warning: {shown_path}: mask values {' '.join(map(str, values[:8]))}"
                      f"{' ...' if len(values) > 8 else ''} are not 0/255: lesion where above {threshold}",
                      file=sys.stderr)
            rows.append(row(base, path, open_image(path), " ".join(map(str, values))))
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "sha256", "size", "width", "height", "mode", "values"])
        writer.writerows(sorted(rows))


def row(base: Path, path: Path, image, values: str) -> list:
    return [path.relative_to(base).as_posix(), file_sha256(path), path.stat().st_size, image.width, image.height,
            image.mode, values]


def run(args, params) -> str:
    return f"{fetch(args.out, params.dataset)} images verified in {args.out}"
