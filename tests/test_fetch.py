import csv
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from busi import BusiError
from busi.cli import check_tables
from busi.config import load_params
from busi.data.cases import read_cases
from busi.data.images import Case
from busi.data.layouts import LAYOUTS
from busi.stages.fetch import fetch
from busi.stages.merge_masks import merge_masks
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


def test_errors_name_the_member_of_the_archive_not_a_temporary_folder(project, busi_folder, tmp_path):
    path = busi_folder / "benign/benign (4).png"
    path.write_bytes(path.read_bytes()[:300])
    archive = zip_folder(busi_folder, tmp_path / "broken.zip")
    fetch_fails(project, archive, f"{archive}: Dataset_BUSI_with_GT/benign/benign (4).png: cannot decode image")


def test_a_mask_of_another_size_is_rejected_by_fetch(project, busi_folder):
    """Found before anything is replaced, not later in merge_masks."""
    mask = busi_folder / "malignant/malignant (3)_mask.png"
    Image.open(mask).resize((40, 30)).save(mask)
    fetch_fails(project, busi_folder, "malignant (3)_mask.png: mask is 40x30, its image is")


def test_a_mask_that_is_not_0_255_is_thresholded_at_its_midpoint_with_a_warning(project, busi_folder):
    mask = busi_folder / "benign/benign (5)_mask.png"
    lesion = np.asarray(Image.open(mask).convert("L")) > 0
    Image.fromarray(np.where(lesion, 198, 20).astype(np.uint8)).save(mask)  # background 20, lesion 198
    result = subprocess.run([sys.executable, "-m", "busi", "fetch"], cwd=project, capture_output=True, text=True,
                            env=run_env(BUSI_ARCHIVE=str(busi_folder)))
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "benign (5)_mask.png: mask values 20 198 are not 0/255: lesion where above 109" in warning
    with (project / "data/raw/manifest.csv").open() as f:
        values = {row["path"].rsplit("/", 1)[1]: row["values"] for row in csv.DictReader(f)}
    assert values["benign (5)_mask.png"] == "20 198" and values["benign (1)_mask.png"] == "0 255"
    assert values["benign (5).png"] == ""  # images: no value set
    merged = merge_masks(project / "data/raw", project / "data/masks")
    assert merged == sum(COUNTS.values())
    out = np.asarray(Image.open(project / "data/masks/benign (5).png")) > 0
    np.testing.assert_array_equal(out, lesion)  # the lesion, not the whole image


def test_zip_bombs_are_refused_by_member_count_and_unpacked_size(project, busi_zip, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(busi_zip))
    monkeypatch.setattr("busi.data.archive.MAX_MEMBERS", 10)
    with pytest.raises(BusiError, match=r"members, more than the limit of 10"):
        fetch(project / "data/raw")
    monkeypatch.setattr("busi.data.archive.MAX_MEMBERS", 20_000)
    monkeypatch.setattr("busi.data.archive.MAX_UNPACKED_BYTES", 2**16)
    with pytest.raises(BusiError, match=r"unpacks to [\d.]+ MiB, more than the limit of 0.1 MiB"):
        fetch(project / "data/raw")
    assert not (project / "data/raw").exists()


def test_symbolic_links_in_a_source_folder_are_not_followed(project, busi_folder, tmp_path):
    (tmp_path / "secret.png").write_bytes((busi_folder / "benign/benign (1).png").read_bytes())
    (busi_folder / "benign/benign (99).png").symlink_to(tmp_path / "secret.png")
    fetch_fails(project, busi_folder, "benign (99).png: a symbolic link in the source folder")


def huge_png_header(path, width=20000, height=20000):
    """A valid PNG signature and header that claims width x height pixels, without the pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(project, busi_folder):
    huge_png_header(busi_folder / "normal/normal (2).png")
    fetch_fails(project, busi_folder, "normal (2).png: image larger than the limit of 50,000,000 pixels")
    huge_png_header(busi_folder / "normal/normal (2).png", 8000, 7000)  # above the limit, below PIL's own
    fetch_fails(project, busi_folder, "normal (2).png: image of 8000x7000 is larger than the limit of 50,000,000")


def test_a_new_layout_is_one_module_and_one_entry(project, busi_folder, tmp_path, monkeypatch):
    """A layout as a user adds one: a module with FOLDER, find_root and scan, registered in LAYOUTS. Here every file
    in one folder, `<label>__<n>.png` beside its `<label>__<n>_mask.png`. Params accept it, fetch reads it, and
    every later stage reads fetch's index, whatever the layout."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(busi_folder.rglob("*).png"))[::5]:  # a few images of each class, with their masks
        stem = f"{image.parent.name}__{image.stem.split('(')[1].rstrip(')')}"
        shutil.copy(image, flat / f"{stem}.png")
        shutil.copy(image.with_name(f"{image.stem}_mask.png"), flat / f"{stem}_mask.png")

    def scan(root, dataset):
        return [Case(path.stem, path.stem.split("__")[0], path, (path.with_name(f"{path.stem}_mask.png"),))
                for path in sorted(root.glob("*.png")) if not path.stem.endswith("_mask")]

    monkeypatch.setitem(LAYOUTS, "flat", SimpleNamespace(FOLDER="flat", find_root=lambda folder, d: folder, scan=scan))
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  layout: busi", "  layout: flat"))
    check_tables(params, load_params(params))  # params accept the registered name
    monkeypatch.setenv("BUSI_ARCHIVE", str(flat))
    count = fetch(project / "data/raw", load_params(params).dataset)
    assert count == len(list(flat.glob("*_mask.png"))) and (project / "data/raw/flat").is_dir()
    assert {case.label for case in read_cases(project / "data/raw")} == {"benign", "malignant", "normal"}
    assert merge_masks(project / "data/raw", project / "data/masks") == count

    params.write_text(params.read_text().replace("  layout: flat", "  layout: flta"))
    with pytest.raises(BusiError, match=r"dataset.layout: 'flta' is not a layout \(layouts: busi, folders, flat\)"):
        check_tables(params, load_params(params))
