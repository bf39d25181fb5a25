import socket
import time

import pytest
import torch
from torch import nn

from busi import BusiError
from busi.config import NetworkConfig, load_params
from busi.model.checkpoint import load_checkpoint, save_checkpoint
from busi.model.network import build_model
from conftest import PARAMS_FILE

PARAMS = load_params(PARAMS_FILE)
NETWORK = NetworkConfig(model=PARAMS.model, image_size=PARAMS.preprocess.image_size)


def model_params(**changes):
    return PARAMS.model.model_copy(update=changes)


@pytest.mark.parametrize("encoder", ["vgg16", "vgg19", "resnet50", "dpn68"])
def test_the_study_encoders_build_with_one_channel_and_two_outputs(encoder):
    model = build_model(model_params(encoder=encoder, pooling="avg")).eval()  # the study's average pooling
    with torch.no_grad():
        mask_logits, class_logits = model(torch.rand(1, 1, 64, 64))
    assert mask_logits.shape == (1, 1, 64, 64) and class_logits.shape == (1, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.encoder.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in model.encoder.modules())


def test_max_pooling_the_default_and_no_attention_an_option():
    assert PARAMS.model.pooling == "max"  # the encoder keeps its own pooling (reports/recipes.md)
    model = build_model(model_params(attention=None))
    assert any(isinstance(m, nn.MaxPool2d) for m in model.encoder.modules())
    assert not any(isinstance(m, nn.AvgPool2d) for m in model.encoder.modules())
    assert not any("SCSE" in type(m).__name__ for m in model.modules())
    assert any("SCSE" in type(m).__name__ for m in build_model(model_params()).modules())


def test_deep_supervision_heads_train_and_stay_out_of_inference():
    from torch.optim.swa_utils import AveragedModel

    from busi.model.network import coarse_mask_logits

    torch.manual_seed(0)
    model = build_model(model_params(deep_supervision=2)).train()
    model(torch.rand(2, 1, 64, 64))
    coarse = coarse_mask_logits(model)
    assert [logits.shape for logits in coarse] == [(2, 1, 32, 32), (2, 1, 16, 16)]  # finest first: 1/2, 1/4
    assert coarse_mask_logits(model) == []  # read once
    copy = AveragedModel(model).module.train()  # the EMA's copy keeps into its own heads, not the original's
    copy(torch.rand(1, 1, 64, 64))
    assert coarse_mask_logits(model) == [] and len(coarse_mask_logits(copy)) == 2
    model.eval()
    with torch.no_grad():
        mask_logits, _ = model(torch.rand(1, 1, 64, 64))
    assert mask_logits.shape == (1, 1, 64, 64) and coarse_mask_logits(model) == []  # inference: the last stage
    plain = build_model(model_params())  # the same network without the heads: only they are new
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("deep_supervision.heads.") for key in extra)
    assert set(plain.state_dict()) <= set(model.state_dict())


def test_unknown_encoder_lists_close_matches():
    with pytest.raises(BusiError, match=r"model.encoder: unknown encoder 'resnet5'; did you mean .*resnet50"):
        build_model(model_params(encoder="resnet5"))


def test_imagenet_weights_fail_fast_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def offline(*args, **kwargs):  # the same answer with or without a network
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    started = time.perf_counter()
    with pytest.raises(BusiError, match="model.encoder_weights: 'imagenet' weights come from the Hugging Face hub"):
        build_model(model_params(encoder_weights="imagenet"))
    assert time.perf_counter() - started < 30


def test_checkpoint_round_trip_and_refuses_non_checkpoints(tmp_path):
    """A checkpoint holds the network's configuration (model section + image size), not the params file."""
    model = build_model(model_params())
    save_checkpoint(tmp_path / "best.pt", model, NETWORK, epoch=7)
    loaded, config, state = load_checkpoint(tmp_path)
    assert config.model == PARAMS.model and config.image_size == PARAMS.preprocess.image_size
    assert state["epoch"] == 7 and "params" not in state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                  strict=True))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BusiError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BusiError, match="notes.txt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict: which network does it fit?
    with pytest.raises(BusiError, match="bare.pt: not a busi checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    other = NETWORK.model_copy(update={"model": model_params(encoder="resnet34")})
    torch.save({"model": model.state_dict(), "config": other.model_dump(mode="json")}, tmp_path / "wrong.pt")
    with pytest.raises(BusiError, match="wrong.pt: the weights do not fit the resnet34 U-Net"):
        load_checkpoint(tmp_path / "wrong.pt")
