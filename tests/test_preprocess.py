import re

import numpy as np
import pytest

from busi import CLASSES, BusiError
from busi.stages.merge_masks import merge_masks
from busi.stages.preprocess import preprocess
from busi.stages.split import split
from test_split import params, read_rows


@pytest.fixture
def staged(busi_folder, tmp_path):
    merge_masks(busi_folder, tmp_path / "masks")
    split(busi_folder, params(folds=2), tmp_path / "splits.csv", tmp_path / "split.json")
    return busi_folder, tmp_path


@pytest.mark.parametrize("size", [64, 96])
def test_one_array_file_per_split(staged, size):
    raw, work = staged
    counts = preprocess(raw, work / "masks", work / "splits.csv", size, work / "processed")
    rows = read_rows(work / "splits.csv")
    for name, count in counts.items():
        data = np.load(work / "processed" / f"{name}.npz")  # no pickle needed: plain arrays only
        expected = [r for r in rows if r["split"] == name]
        assert count == len(expected) == len(data["ids"])
        assert data["images"].shape == data["masks"].shape == (count, size, size)
        assert data["images"].dtype == np.uint8 and set(np.unique(data["masks"])) <= {0, 1}
        assert list(data["ids"]) == [r["image_id"] for r in expected]
        assert list(data["groups"]) == [r["group"] for r in expected]  # the bootstrap draws whole scans
        assert list(data["labels"]) == [CLASSES.index(r["label"]) for r in expected]
        for image_id, (height, width), mask in zip(data["ids"], data["sizes"], data["masks"], strict=True):
            assert height > 100 and width > 100
            assert mask.any() == (not image_id.startswith("normal"))


def test_missing_merged_mask_names_the_file(staged):
    raw, work = staged
    kept = read_rows(work / "splits.csv")[0]["image_id"]
    (work / "masks" / f"{kept}.png").unlink()
    with pytest.raises(BusiError, match=re.escape(f"{kept}.png: merged mask missing")):
        preprocess(raw, work / "masks", work / "splits.csv", 64, work / "processed")
    assert not (work / "processed").exists()
