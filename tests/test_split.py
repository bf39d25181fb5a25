import csv
import json

import pytest

from busi.config import load_params
from busi.stages.split import split
from conftest import PARAMS_FILE
from synthetic import COUNTS


def read_rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def params(**changes):
    base = load_params(PARAMS_FILE).split
    return base.model_copy(update=changes)


def test_split_keeps_copies_together_and_drops_conflicts(busi_folder, tmp_path):
    report = split(busi_folder, params(folds=2), tmp_path / "splits.csv", tmp_path / "split.json")
    rows = read_rows(tmp_path / "splits.csv")
    assert list(rows[0]) == ["image_id", "label", "split", "group", "fold"]
    ids = {row["image_id"] for row in rows}
    # malignant (2) is a re-scaled crop of benign (1): a group filed under two classes, left out by default.
    assert report["conflicts"]["members"] == {"benign (1)": ["benign (1)", "malignant (2)"]}
    assert "benign (1)" not in ids and "malignant (2)" not in ids
    assert len(rows) == sum(COUNTS.values()) - 2
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    assert json.loads((tmp_path / "split.json").read_text()) == report
    assert report["counts"]["train"]["total"] + report["counts"]["val"]["total"] + \
        report["counts"]["test"]["total"] == len(rows)


def test_keep_puts_a_conflict_group_in_one_split(busi_folder, tmp_path):
    split(busi_folder, params(conflicts="keep", folds=2), tmp_path / "splits.csv", tmp_path / "split.json")
    rows = {row["image_id"]: row for row in read_rows(tmp_path / "splits.csv")}
    assert rows["benign (1)"]["group"] == rows["malignant (2)"]["group"] == "benign (1)"
    assert rows["benign (1)"]["split"] == rows["malignant (2)"]["split"]
    assert rows["malignant (2)"]["label"] == "malignant"  # each image keeps its own label


def test_split_is_seeded(busi_folder, tmp_path):
    first = split(busi_folder, params(folds=2), tmp_path / "a.csv", tmp_path / "a.json")
    second = split(busi_folder, params(folds=2), tmp_path / "b.csv", tmp_path / "b.json")
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text() and first == second


def test_folds_cover_train_and_val_only(busi_folder, tmp_path):
    split(busi_folder, params(folds=2), tmp_path / "splits.csv", tmp_path / "split.json")
    for row in read_rows(tmp_path / "splits.csv"):
        assert (row["fold"] == "-1") == (row["split"] == "test")
        assert row["fold"] in {"-1", "0", "1"}


def test_too_many_folds_is_a_param_error(busi_folder, tmp_path):
    from busi import BusiError

    with pytest.raises(BusiError, match="split.folds"):
        split(busi_folder, params(folds=40), tmp_path / "splits.csv", tmp_path / "split.json")
