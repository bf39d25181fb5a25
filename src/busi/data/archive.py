"""Where the raw data comes from and how it is read safely: $BUSI_ARCHIVE or Kaggle, content fingerprints, and
zip archives extracted only inside their target (capped in members and unpacked size; no links). Shared by the
source, fetch and evaluate-external stages: one way to read a folder or zip."""

import hashlib
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from busi import BusiError

KAGGLE_DATASET = "aryashah2k/breast-ultrasound-images-dataset"
MAX_MEMBERS = 20_000  # BUSI has 1,578 files
MAX_UNPACKED_BYTES = 4 * 2**30  # BUSI unpacks to about 0.2 GiB


def archive_path() -> Path | None:
    """$BUSI_ARCHIVE, checked to exist; None means Kaggle."""
    value = os.environ.get("BUSI_ARCHIVE")
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise BusiError(f"BUSI_ARCHIVE={value}: no such file or folder")
    return path  # the path you name may be a link; links inside a source folder are refused (fetch)


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


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip inside `target` only: absolute paths, '..' and symbolic links are refused, and so are more
    than MAX_MEMBERS members or more than MAX_UNPACKED_BYTES unpacked (zipfile never yields more bytes than a
    member's header declares, so the declared sizes bound what is written)."""
    if not zipfile.is_zipfile(archive):
        raise BusiError(f"{archive}: not a zip archive (give a .zip or an extracted folder)")
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            raise BusiError(f"{archive}: {len(members):,} members, more than the limit of {MAX_MEMBERS:,}")
        unpacked = sum(member.file_size for member in members)
        if unpacked > MAX_UNPACKED_BYTES:
            raise BusiError(f"{archive}: unpacks to {unpacked / 2**20:,.1f} MiB, more than the limit of "
                            f"{MAX_UNPACKED_BYTES / 2**20:,.1f} MiB")
        for member in members:
            name = PurePosixPath(member.filename.replace("\\", "/"))
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            if name.is_absolute() or ".." in name.parts or is_link or ":" in member.filename:
                raise BusiError(f"{archive}: member {member.filename!r} would escape the target folder")
        zf.extractall(target)


def refuse_links(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise BusiError(f"{path}: a symbolic link in the source folder (links are not followed)")
