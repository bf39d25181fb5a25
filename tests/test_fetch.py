import csv
import os
import stat
import subprocess
import sys
import time
import zipfile

import pytest

from busi import BusiError
from busi.stages.fetch import fetch
from conftest import run_env
from synthetic import COUNTS, zip_folder


def test_fetch_from_zip_verifies_and_writes_manifest(project, busi_zip, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(busi_zip))
    assert fetch(project / "data/raw") == sum(COUNTS.values())
    root = project / "data/raw/Dataset_BUSI_with_GT"
    assert sorted(p.name for p in root.iterdir()) == ["benign", "malignant", "normal"]
    with (project / "data/raw/manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(root.rglob("*.png")))
    modes = {row["path"].rsplit("/", 1)[1]: row["mode"] for row in rows}
    assert modes["benign (3).png"] == "RGB" and modes["benign (2)_mask_1.png"] == "RGBA"
    assert modes["benign (1)_mask.png"] == "1"
    assert all(len(row["sha256"]) == 64 and int(row["width"]) > 0 for row in rows)


def test_fetch_from_extracted_folder(project, busi_folder, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(busi_folder.parent))
    assert fetch(project / "data/raw") == sum(COUNTS.values())


def test_offline_without_archive_fails_fast_with_instructions(project):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "busi", "fetch"], cwd=project, capture_output=True, text=True,
                            env={k: v for k, v in run_env().items() if k != "BUSI_ARCHIVE"})
    assert result.returncode == 1
    assert time.perf_counter() - started < 30  # "within seconds": far from any network time-out
    line, = result.stderr.strip().splitlines()
    assert "kaggle.com/datasets/aryashah2k/breast-ultrasound-images-dataset" in line
    assert "BUSI_ARCHIVE=" in line


def fetch_fails(project, source, message):
    """Fetch from `source` over an earlier good output: one clear line, exit 1, earlier output intact."""
    raw = project / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "earlier.txt").write_text("previous good output")
    result = subprocess.run([sys.executable, "-m", "busi", "fetch"], cwd=project, capture_output=True,
                            text=True, env=run_env(BUSI_ARCHIVE=str(source)))
    assert result.returncode == 1, result.stdout
    line, = result.stderr.strip().splitlines()
    assert message in line
    assert (raw / "earlier.txt").read_text() == "previous good output"
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]  # no temporary folder left behind


def test_truncated_png(project, busi_folder):
    path = busi_folder / "benign/benign (4).png"
    path.write_bytes(path.read_bytes()[:300])
    fetch_fails(project, busi_folder, "benign (4).png: cannot decode image")


def test_missing_mask(project, busi_folder):
    (busi_folder / "malignant/malignant (3)_mask.png").unlink()
    fetch_fails(project, busi_folder, "malignant (3).png: image without any mask")


def test_orphan_mask(project, busi_folder):
    (busi_folder / "normal/normal (2).png").unlink()
    fetch_fails(project, busi_folder, "normal (2)_mask.png: mask without its image")


def test_unknown_class_folder(project, busi_folder):
    (busi_folder / "suspicious").mkdir()
    fetch_fails(project, busi_folder, "suspicious: unknown class folder")


def test_empty_dataset(project, tmp_path):
    for label in COUNTS:
        (tmp_path / "empty/Dataset_BUSI_with_GT" / label).mkdir(parents=True)
    fetch_fails(project, tmp_path / "empty", "empty dataset")


def test_not_an_archive(project, tmp_path):
    (tmp_path / "busi.zip").write_text("this is not a zip")
    fetch_fails(project, tmp_path / "busi.zip", "busi.zip: not a zip archive")


def test_missing_archive(project, tmp_path):
    fetch_fails(project, tmp_path / "nowhere.zip", "nowhere.zip: no such file or folder")


@pytest.mark.parametrize("member", ["../evil.png", "/etc/evil.png", "Dataset_BUSI_with_GT/../../evil.png"])
def test_zip_member_escaping_the_target_is_refused(project, busi_folder, tmp_path, member):
    archive = zip_folder(busi_folder, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, b"payload")
    fetch_fails(project, archive, f"member {member!r} would escape the target folder")
    assert not (tmp_path / "evil.png").exists() and not os.path.exists("/etc/evil.png")


def test_zip_symlink_member_is_refused(project, busi_folder, tmp_path):
    archive = zip_folder(busi_folder, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("Dataset_BUSI_with_GT/benign/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    fetch_fails(project, archive, "would escape the target folder")


def test_failure_in_library_call_leaves_output_intact(project, busi_folder, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(busi_folder))
    fetch(project / "data/raw")
    before = sorted(p.relative_to(project) for p in (project / "data/raw").rglob("*"))
    (busi_folder / "benign/benign (5)_mask.png").unlink()
    with pytest.raises(BusiError):
        fetch(project / "data/raw")
    assert sorted(p.relative_to(project) for p in (project / "data/raw").rglob("*")) == before
