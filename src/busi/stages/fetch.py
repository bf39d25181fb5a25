"""Stage fetch: the raw BUSI archive, from a local file/folder (BUSI_ARCHIVE) or Kaggle, verified and
written atomically to data/raw/Dataset_BUSI_with_GT with a manifest of every file."""

import csv
import hashlib
import os
import shutil
import socket
import stat
import zipfile
from pathlib import Path, PurePosixPath

from busi import BusiError
from busi.data.busi_layout import DATASET_DIR, find_root, open_image, scan
from busi.files import atomic_dir

KAGGLE_DATASET = "aryashah2k/breast-ultrasound-images-dataset"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
MANIFEST = "manifest.csv"


def fetch(out_dir: Path) -> int:
    """Fetch, verify and place the dataset in `out_dir`; returns the number of images."""
    source = os.environ.get("BUSI_ARCHIVE")
    source = Path(source).expanduser() if source else download_from_kaggle()
    with atomic_dir(out_dir) as tmp:
        if source.is_dir():
            shutil.copytree(find_root(source), tmp / DATASET_DIR)
        elif source.is_file():
            unpacked = tmp / ".unpacked"
            safe_extract(source, unpacked)
            try:
                find_root(unpacked).rename(tmp / DATASET_DIR)
            except BusiError:
                raise BusiError(f"{source}: no {DATASET_DIR}/ or class folders inside the archive") from None
            shutil.rmtree(unpacked, ignore_errors=True)
        else:
            raise BusiError(f"BUSI_ARCHIVE={source}: no such file or folder")
        cases = scan(tmp / DATASET_DIR)
        write_manifest(tmp, tmp / MANIFEST)
    return len(cases)


def download_from_kaggle() -> Path:
    """Kaggle's public copy through kagglehub (no credentials needed); fails fast when offline."""
    try:
        socket.create_connection(("www.kaggle.com", 443), timeout=5).close()
    except OSError as err:
        raise BusiError(
            f"cannot reach Kaggle ({err}); download the archive from {KAGGLE_URL} "
            "and run with BUSI_ARCHIVE=/path/to/archive.zip (or the extracted folder)"
        ) from None
    import kagglehub  # imported late: it is slow to import and only needed online

    return Path(kagglehub.dataset_download(KAGGLE_DATASET))


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip inside `target` only: absolute paths, '..' and symbolic links are refused."""
    if not zipfile.is_zipfile(archive):
        raise BusiError(f"BUSI_ARCHIVE={archive}: not a zip archive (give a .zip or an extracted folder)")
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            name = PurePosixPath(member.filename.replace("\\", "/"))
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            if name.is_absolute() or ".." in name.parts or is_link or ":" in member.filename:
                raise BusiError(f"{archive}: member {member.filename!r} would escape the target folder")
        zf.extractall(target)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(base: Path, manifest: Path) -> None:
    """One row per PNG: path, sha256, size, width, height, mode. Decoding every file verifies it."""
    rows = []
    for path in sorted((base / DATASET_DIR).rglob("*.png")):
        image = open_image(path)
        rows.append([path.relative_to(base).as_posix(), sha256(path), path.stat().st_size,
                     image.width, image.height, image.mode])
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "sha256", "size", "width", "height", "mode"])
        writer.writerows(rows)
