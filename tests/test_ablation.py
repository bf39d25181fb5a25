"""busi ablate: validation metrics as each post-processing step is added, from a checkpoint, never the test split."""

import numpy as np
import pytest
import torch

from busi.cli import main
from busi.commands.ablate import ablate, markdown
from busi.config import NetworkConfig, load_params
from busi.model.checkpoint import save_checkpoint
from busi.model.crop import save_crop_checkpoint
from busi.model.network import build_model
from conftest import PARAMS_FILE, SIZE
from test_crop import constant_crop_network

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path):
    model = load_params(PARAMS_FILE).model.model_copy(update={"encoder": "resnet18"})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models/best.pt", build_model(model), NetworkConfig(model=model, image_size=SIZE),
                    epoch=3)
    return tmp_path / "models"


def test_one_row_per_step_on_the_validation_split(processed, synthetic_source, checkpoint, tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr("busi.commands.ablate.load_split",
                        lambda d, name: read.append(name) or dict(np.load(d / f"{name}.npz")))
    table = ablate([checkpoint], processed, processed.parent / "masks", 0.5)
    assert read == ["val"]  # never the test split
    assert list(table["post-processing"]) == ["none", "+ flip_tta on", "+ min_lesion_area 0.01",
                                              "+ largest_component on", "+ label_from_mask on",
                                              "+ mask_from_label on (label_from_mask off)"]  # STEPS, in order
    assert table["model"].str.endswith("(epoch 3)").all()
    numbers = table[["per-image Dice", "weighted F1", "accuracy"]].to_numpy(float)
    assert ((numbers >= 0) & (numbers <= 1)).all()
    text = markdown(table)
    assert text.splitlines()[0].startswith("| model | post-processing | IoU | Dice |")
    assert len(text.splitlines()) == 2 + 6  # header, rule, a row per step

    # With a crop network beside the checkpoint, the crop weight is a row too (where STEPS has it).
    save_crop_checkpoint(tmp_path / "crop.pt", constant_crop_network(0.9))
    table = ablate([checkpoint], processed, processed.parent / "masks", 0.5, tmp_path / "crop.pt", synthetic_source)
    assert list(table["post-processing"])[3:5] == ["+ largest_component on", "+ crop_weight 0.75"]


def test_a_checkpoint_of_another_size_is_one_error(processed, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((PARAMS_FILE).read_text())
    other = tmp_path / "other"
    other.mkdir()
    val = dict(np.load(processed / "val.npz"))
    val["images"] = np.zeros((len(val["images"]), 32, 32), np.uint8)
    np.savez(other / "val.npz", **val)
    assert main(["ablate", str(checkpoint), "--data", str(other), "--masks", str(processed.parent / "masks")]) == 1
    assert f"trained at {SIZE} px, but {other} holds 32 px images" in capsys.readouterr().err
