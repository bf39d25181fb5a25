"""bench/by_number.py: a per-image table broken down by BUSI's file numbers, on a hand-worked table."""

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "by_number.py"


def load_script():
    spec = importlib.util.spec_from_file_location("by_number", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bins_of_consecutive_file_numbers_count_misses_dice_and_labels():
    cases = pd.DataFrame({
        "image_id": ["benign (1)", "benign (25)", "benign (26)", "benign (101)", "normal (3)"],
        "label": ["benign", "benign", "benign", "benign", "normal"],
        "predicted_label": ["benign", "normal", "malignant", "benign", "normal"],
        "dice": [0.8, 0.0, 0.5, 0.9, float("nan")],
        "predicted_area_px": [10, 0, 5, 7, 0],
    })
    table = load_script().by_number(cases, "benign", 25)
    # numbers 1 and 25 share the first bin; 26 opens the second; 101 the fifth (bins with no image are left out)
    assert table.index.tolist() == ["1-25", "26-50", "101-125"]
    assert table["images"].tolist() == [2, 1, 1]
    assert table["none drawn"].tolist() == [1, 0, 0]
    assert table["per-image Dice"].tolist() == [0.4, 0.5, 0.9]
    assert table.loc["1-25", ["called benign", "called malignant", "called normal"]].tolist() == [1, 0, 1]
    assert table.loc["26-50", "called malignant"] == 1
