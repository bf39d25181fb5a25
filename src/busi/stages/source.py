"""Stage source: which archive the pipeline is built from, as a fingerprint of its content.

The archive comes from $BUSI_ARCHIVE (a .zip or an extracted folder) or, when it is unset, from Kaggle. DVC
cannot track an environment variable, so this stage runs on every `dvc repro` (always_changed) and writes
data/source.json: the kind of source and the SHA-256 of its content (for a folder, of every file's path and
content). fetch depends on that file, so it re-runs exactly when the content changes, whatever the path.
"""

import json
from pathlib import Path

from busi.data.archive import KAGGLE_DATASET, archive_path, file_sha256, folder_sha256
from busi.files import atomic_file


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


def run(args, params) -> str:
    found = source(args.out)
    return f"{found['path']} ({found['kind']}{', sha256 ' + found['sha256'][:12] if 'sha256' in found else ''})"
