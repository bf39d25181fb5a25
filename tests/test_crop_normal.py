"""bench/crop_normal.py: the crop network's say on normal against lesion, on hand-worked probabilities."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script():
    sys.path.insert(0, str(BENCH))  # it imports bench/crop_classifier.py, as when run from the command line
    try:
        spec = importlib.util.spec_from_file_location("crop_normal", BENCH / "crop_normal.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_normal_say_mixes_the_normal_probability_where_a_region_is_drawn():
    heads = np.array([[0.2, 0.2, 0.6],    # the head says normal; the crop network sees a lesion
                      [0.6, 0.3, 0.1],    # the head says benign; the crop network says normal
                      [0.5, 0.3, 0.2]])   # nothing drawn: the head's, unchanged
    crop_normal = np.array([0.0, 0.9, np.nan])
    said = load_script().normal_say(heads, crop_normal, 0.5)
    # normal 0.5 x 0.6 + 0.5 x 0.0 = 0.3; benign and malignant share 0.7 as 0.2 : 0.2
    np.testing.assert_allclose(said[0], [0.35, 0.35, 0.3])
    # normal 0.5 x 0.1 + 0.5 x 0.9 = 0.5; benign and malignant share 0.5 as 0.6 : 0.3
    np.testing.assert_allclose(said[1], [1 / 3, 1 / 6, 0.5])
    np.testing.assert_allclose(said[2], heads[2])
    np.testing.assert_allclose(said.sum(1), 1)
    assert said.argmax(1).tolist() == [0, 2, 0]  # the first image is now a lesion, the second normal
