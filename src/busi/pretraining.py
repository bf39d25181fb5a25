"""Self-supervised pretraining: before it learns the masks, the U-Net learns to restore its own training images
from distorted copies (`train.pretrain_epochs`). No labels and no data beyond the training split: the images a
from-scratch network would see anyway, used once more for what their pixels alone can teach (the in-painting
and intensity restoration of Models Genesis, Zhou et al. 2021, with SimMIM's masked patches).

The whole U-Net restores (encoder and decoder, its mask output read as intensities); then its last layer is
drawn afresh, so that the masks are learned by a head that never predicted intensities.
"""

import math

import numpy as np
import torch
from segmentation_models_pytorch.base.initialization import initialize_head
from torch import nn

PATCH = 16     # pixels: the image is a grid of square patches (the image side is a multiple of 32)
HIDDEN = 0.5   # the share of each image's patches replaced by noise
GAMMA = 2.0    # each image goes through x ** g, log g uniform in [-log GAMMA, +log GAMMA]


def distort(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [N,1,S,S] in [0,1] -> their distorted copies: a random intensity curve per image, then HIDDEN of
    its PATCH x PATCH patches (exactly that many, drawn at random) replaced by uniform noise."""
    n, _, side, _ = images.shape
    gamma = torch.exp((2 * torch.rand(n, 1, 1, 1, generator=generator) - 1) * math.log(GAMMA))
    curved = images.clamp(0, 1) ** gamma
    grid = side // PATCH
    ranks = torch.rand(n, grid * grid, generator=generator).argsort(1).argsort(1)  # a random order of the patches
    hidden = (ranks < round(HIDDEN * grid * grid)).reshape(n, 1, grid, grid)
    hidden = hidden.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    return torch.where(hidden, torch.rand(images.shape, generator=generator), curved)


def pretrain(model: nn.Module, images: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int,
             device: torch.device, amp_dtype: torch.dtype | None, on_epoch=None) -> list[float]:
    """`epochs` passes over `images` (uint8 [N,S,S]), each batch mirrored at random and distorted; the loss is the
    mean squared error between the model's mask output and the undistorted batch. AdamW, cosine schedule to 0.
    Returns the loss of each epoch; `on_epoch(row)` hears each as a row like the training loop's
    ({"epoch": ..., "pretrain_loss": ...})."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images).unsqueeze(1)
    steps = max(1, len(data) // batch_size)  # drop the last partial batch: one image breaks BatchNorm
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    model.train()
    losses = []
    for epoch in range(1, epochs + 1):
        order, total = torch.randperm(len(data), generator=generator), 0.0
        for step in range(steps):
            batch = data[order[step * batch_size:(step + 1) * batch_size]].float().div_(255)
            mirror = torch.rand(len(batch), generator=generator) < 0.5
            batch[mirror] = batch[mirror].flip(-1)
            inputs = distort(batch, generator).to(device, memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                restored, _ = model(inputs)
            loss = nn.functional.mse_loss(restored.float(), batch.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        losses.append(total / steps)
        print(f"pretraining epoch {epoch}/{epochs}: restoration loss {losses[-1]:.4f}", flush=True)
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "pretrain_loss": losses[-1]})
    initialize_head(model.segmentation_head)  # the mask head starts afresh; encoder and decoder keep what they learned
    return losses
