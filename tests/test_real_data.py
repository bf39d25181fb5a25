"""Checks on the real BUSI archive (../shared/data/busi), skipped where it is absent."""

import collections
import csv

import pytest

from busi.dataset import find_root, scan
from busi.fetch import fetch
from busi.masks import merge_masks

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
