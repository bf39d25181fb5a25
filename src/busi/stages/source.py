"""Stage source: which archive the pipeline is built from, as a fingerprint of its content.

The archive comes from $BUSI_ARCHIVE (a .zip or an extracted folder) or, when it is unset, from Kaggle. DVC
cannot track an environment variable, so this stage runs on every `dvc repro` (always_changed) and writes
data/source.json: the kind of source and the SHA-256 of its content (for a folder, of every file's path and
content). fetch depends on that file, so it re-runs exactly when the content changes, whatever the path.
"""

import hashlib
import json
import os
from pathlib import Path

from busi import BusiError
from busi.files import atomic_file

KAGGLE_DATASET = "aryashah2k/breast-ultrasound-images-dataset"


def archive_path() -> Path | None:
    """$BUSI_ARCHIVE, checked to exist; None means Kaggle."""
    value = os.environ.get("BUSI_ARCHIVE")
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise BusiError(f"BUSI_ARCHIVE={value}: no such file or folder")
    return path  # the path you name may be a link; links inside a source folder are refused (fetch)


def source(out_json: Path) -> dict:
    """Write the fingerprint of the source to `out_json` (unchanged bytes when the content is unchanged)."""
    path = archive_path()
    if path is None:
        fingerprint = {"kind": "kaggle", "dataset": KAGGLE_DATASET}
    elif path.is_dir():
        fingerprint = {"kind": "folder", "sha256": folder_sha256(path)}
    else:
        fingerprint = {"kind": "file", "sha256": file_sha256(path)}
    text = json.dumps(fingerprint, indent=2) + "\n"
    if not Path(out_json).is_file() or Path(out_json).read_text() != text:
        with atomic_file(out_json) as tmp:
            tmp.write_text(text)
    return {**fingerprint, "path": str(path) if path else f"kaggle:{KAGGLE_DATASET}"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """Every file's relative path and content, in sorted order; symbolic links are refused, not followed."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise BusiError(f"{path}: a symbolic link in the source folder (links are not followed)")
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
