import numpy as np
import pytest
from PIL import Image

from busi import BusiError
from busi.data.images import read_mask
from busi.stages.merge_masks import merge_masks
from synthetic import COUNTS


def test_merged_mask_is_the_or_of_all_mask_files(busi_folder, tmp_path):
    assert merge_masks(busi_folder, tmp_path / "masks") == sum(COUNTS.values())
    for image_id, parts in [("benign (1)", 2), ("benign (2)", 3), ("malignant (4)", 1)]:
        merged = np.asarray(Image.open(tmp_path / "masks" / f"{image_id}.png"))
        label = image_id.split()[0]
        files = sorted((busi_folder / label).glob(f"{image_id}_mask*.png"))
        assert len(files) == parts
        expected = np.logical_or.reduce([read_mask(f) for f in files])
        assert merged.dtype == np.uint8 and set(np.unique(merged)) <= {0, 255}
        assert np.array_equal(merged > 0, expected) and expected.any()
        assert merged.shape == Image.open(busi_folder / label / f"{image_id}.png").size[::-1]


def test_rgba_mask_is_read_from_its_colour(busi_folder):
    rgba = busi_folder / "benign/benign (2)_mask_1.png"
    assert Image.open(rgba).mode == "RGBA"
    mask = read_mask(rgba)
    assert 0 < mask.mean() < 0.5  # the opaque alpha channel alone would make it all lesion


def test_normal_images_get_empty_masks(busi_folder, tmp_path):
    merge_masks(busi_folder, tmp_path / "masks")
    for path in (tmp_path / "masks").glob("normal*.png"):
        assert not np.asarray(Image.open(path)).any()


def test_mask_of_another_size_is_an_error_naming_it(busi_folder, tmp_path):
    Image.new("L", (50, 40)).save(busi_folder / "benign/benign (1)_mask_1.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks/earlier.png").write_bytes(b"earlier")
    with pytest.raises(BusiError, match=r"benign \(1\)_mask_1.png: mask is 50x40, its image is \d+x\d+"):
        merge_masks(busi_folder, tmp_path / "masks")
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["earlier.png"]
