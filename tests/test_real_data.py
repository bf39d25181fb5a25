"""Checks on the real BUSI archive (../shared/data/busi), skipped where it is absent."""

import collections
import csv

import pytest

from busi.config import load_params
from busi.data.layouts.busi import find_root, scan
from busi.stages.fetch import fetch
from busi.stages.merge_masks import merge_masks
from busi.stages.split import split
from conftest import PARAMS_FILE

pytestmark = pytest.mark.slow


def test_real_archive_counts(real_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(real_archive))
    assert fetch(tmp_path / "raw") == 780
    cases = scan(find_root(tmp_path / "raw"))
    assert collections.Counter(c.label for c in cases) == {"benign": 437, "malignant": 210, "normal": 133}
    assert sum(len(c.masks) for c in cases) == 798
    with (tmp_path / "raw/manifest.csv").open() as f:
        modes = collections.Counter(row["mode"] for row in csv.DictReader(f))
    assert modes["RGB"] == 16 and modes["RGBA"] == 2  # Doppler images, two RGBA masks
    assert merge_masks(tmp_path / "raw", tmp_path / "masks") == 780


def test_real_split_keeps_every_group_of_copies_in_one_split(real_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(real_archive))
    fetch(tmp_path / "raw")
    params = load_params(PARAMS_FILE).split
    report = split(tmp_path / "raw", params, tmp_path / "splits.csv", tmp_path / "split.json")
    with (tmp_path / "splits.csv").open() as f:
        rows = list(csv.DictReader(f))
    splits_of_group = collections.defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    folds_of_group = collections.defaultdict(set)  # cross-validation folds: a group of copies in one fold
    for row in rows:
        folds_of_group[row["group"]].add(row["fold"])
        assert (row["fold"] == "-1") == (row["split"] == "test")  # every train+val image in exactly one fold
    assert all(len(f) == 1 for f in folds_of_group.values())
    # The byte-identical pair of the archive is one group, filed under two classes: a conflict, dropped.
    assert report["conflicts"]["members"]["benign (433)"] == ["benign (433)", "malignant (145)"]
    assert len(rows) == 780 - report["conflicts"]["images"]
    assert report["groups_with_copies"] > 100  # BUSI's many re-scaled copies are found
    # Consecutive frames of one lesion (checked by eye) are grouped: before, each pair straddled two splits.
    group = {row["image_id"]: row["group"] for row in rows}
    for a, b in [("benign (125)", "benign (126)"), ("benign (244)", "benign (305)"), ("benign (343)", "benign (361)"),
                 ("malignant (27)", "malignant (28)"), ("malignant (69)", "malignant (70)"),
                 # found by the whole image: masks that disagree, a cine of seven frames, normal frames
                 ("benign (108)", "benign (94)"), ("benign (61)", "benign (122)"), ("benign (240)", "benign (300)"),
                 ("malignant (120)", "malignant (122)"), ("malignant (85)", "malignant (86)"),
                 ("normal (10)", "normal (9)")]:
        assert group[a] == group[b], (a, b)
    assert sum(g == group["benign (61)"] for g in group.values()) == 7
    assert "benign (403)" in report["conflicts"]["members"]["benign (399)"]  # a frame of a conflicting pair
    assert report["frame_pairs"] >= 25
    for name, fraction in [("train", 0.70), ("val", 0.15), ("test", 0.15)]:
        assert abs(report["counts"][name]["total"] / len(rows) - fraction) < 0.02


def test_real_archive_in_the_folders_layout_gives_the_same_split(real_archive, tmp_path, monkeypatch):
    """BUSI rewritten as images/, masks/mask_<id>.png (merged) and a labels CSV with its own column names and the
    split's groups as the patient column (as bench/busi_as_folders.py writes it): fetched and split in the
    folders layout, the same images land in the same split and fold."""
    import numpy as np
    from PIL import Image

    from busi.config import DatasetParams
    from busi.data.cases import read_case, read_cases

    monkeypatch.setenv("BUSI_ARCHIVE", str(real_archive))
    fetch(tmp_path / "raw")
    params = load_params(PARAMS_FILE).split
    split(tmp_path / "raw", params, tmp_path / "splits.csv", tmp_path / "split.json")
    busi_rows = {row["image_id"]: row for row in csv.DictReader((tmp_path / "splits.csv").open())}

    folders = tmp_path / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "masks").mkdir()
    lines = ["file,diagnosis,patient,source"]
    for case in read_cases(tmp_path / "raw"):
        (folders / "images" / f"{case.image_id}.png").write_bytes(case.image.read_bytes())
        Image.fromarray(read_case(case)[1].astype(np.uint8) * 255).save(folders / "masks" / f"mask_{case.image_id}.png")
        group = busi_rows[case.image_id]["group"] if case.image_id in busi_rows else ""
        lines.append(f'"{case.image_id}",{case.label.upper()},"{group}",BUSI')
    (folders / "labels.csv").write_text("\n".join(lines) + "\n")
    dataset = DatasetParams(layout="folders", mask_name="mask_{id}.png", id_column="file", label_column="diagnosis",
                            case_column="patient")
    monkeypatch.setenv("BUSI_ARCHIVE", str(folders))
    assert fetch(tmp_path / "raw_folders", dataset) == 780
    split(tmp_path / "raw_folders", params, tmp_path / "splits_folders.csv", tmp_path / "split_folders.json")
    folders_rows = {row["image_id"]: row for row in csv.DictReader((tmp_path / "splits_folders.csv").open())}
    assert folders_rows.keys() == busi_rows.keys() and len(busi_rows) == 760
    assert all((folders_rows[i]["split"], folders_rows[i]["fold"]) == (busi_rows[i]["split"], busi_rows[i]["fold"])
               for i in busi_rows)
