"""Self-supervised pretraining: the distortion hides exactly its share of whole patches, the restoration loss
falls, the mask head starts afresh, and a training with pretraining logs it and is another configuration."""

import numpy as np
import torch

from busi.model.network import build_model
from busi.pretraining import HIDDEN, PATCH, distort, pretrain
from busi.training import params_fingerprint, train
from conftest import tiny_params


def test_distortion_hides_whole_patches_and_keeps_black_and_white():
    # 0 and 1 are fixed points of every curve x ** g, so whatever is not noise is the image itself.
    images = torch.zeros(3, 1, 64, 64)
    images[:, :, :, 32:] = 1.0  # left half black, right half white
    distorted = distort(images, torch.Generator().manual_seed(0))
    changed = distorted != images
    # 64 px is a 4 x 4 grid of 16-px patches: HIDDEN = 0.5 hides 8 of the 16 in each image, 8 * 256 pixels.
    assert PATCH == 16 and HIDDEN == 0.5
    patches = changed.reshape(3, 4, 16, 4, 16).permute(0, 1, 3, 2, 4).reshape(3, 16, 256)
    fully, partly = patches.all(-1), patches.any(-1)
    assert fully.sum(1).tolist() == [8, 8, 8]  # noise is never exactly 0 or 1
    assert torch.equal(fully, partly)  # whole patches, aligned to the grid
    assert not torch.equal(fully[0], fully[1])  # each image its own patches
    assert ((distorted >= 0) & (distorted <= 1)).all()


def test_gray_levels_go_through_one_curve_per_image():
    images = torch.full((64, 1, 32, 32), 0.25)
    distorted = distort(images, torch.Generator().manual_seed(1))
    levels = distorted.reshape(64, -1).mode(1).values  # the curved gray level: noise never repeats a value
    # 0.25 ** g with log g uniform in [-log 2, log 2]: between 0.25 ** 2 = 0.0625 and 0.25 ** 0.5 = 0.5.
    assert levels.min() >= 0.0625 - 1e-6 and levels.max() <= 0.5 + 1e-6
    assert levels.std() > 0.05  # not one curve for the whole batch


def test_restoration_loss_falls_and_the_mask_head_starts_afresh():
    torch.manual_seed(0)
    model = build_model(tiny_params().model)
    rng = np.random.default_rng(0)
    images = np.zeros((16, 32, 32), np.uint8)
    for image in images:  # a bright disc on a dark, noisy background
        y, x = rng.integers(8, 24, 2)
        yy, xx = np.mgrid[:32, :32]
        image[:] = rng.integers(0, 40, (32, 32))
        image[(yy - y) ** 2 + (xx - x) ** 2 < 36] = 200
    encoder_before = model.encoder.conv1.weight.detach().clone()
    losses = pretrain(model, images, epochs=8, batch_size=4, lr=0.003, seed=0, device=torch.device("cpu"),
                      amp_dtype=None)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(model.encoder.conv1.weight, encoder_before)  # the encoder keeps what it learned
    assert torch.count_nonzero(model.segmentation_head[0].bias) == 0  # smp's head initialisation: bias 0


def test_a_pretrained_training_logs_its_restoration_loss_and_is_another_configuration(processed, tmp_path, store):
    params = tiny_params(epochs=1, pretrain_epochs=2)
    assert params_fingerprint(params) != params_fingerprint(tiny_params(epochs=1))
    summary = train(processed, params, tmp_path / "models", tmp_path / "train.json", tmp_path / "history.csv")
    history = store.get_metric_history(summary["run_id"], "pretrain/loss")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    assert summary["epochs_run"] == 1
