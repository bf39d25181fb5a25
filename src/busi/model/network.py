"""One factory for every model: a segmentation_models_pytorch U-Net with one input channel, optional
scSE attention in the decoder and a normal/benign/malignant classification head, which sees either the whole
image (smp's head) or also the predicted lesion (`LesionHead`), and optionally deeply supervised
(`DeepSupervision`, training only)."""

import difflib
import os
import socket
from functools import partial

import segmentation_models_pytorch as smp
import torch
from torch import nn

from busi import CLASSES, BusiError
from busi.config import ModelParams


def encoder_names() -> list[str]:
    return smp.encoders.get_encoder_names()


def build_model(params: ModelParams) -> nn.Module:
    """`model(x)` returns (mask logits [N,1,H,W], class logits [N,3])."""
    check_encoder(params.encoder)
    if params.encoder_weights:
        check_hub_reachable(params.encoder_weights)
    model = (LesionAwareUnet if params.class_head == "lesion" else smp.Unet)(
        encoder_name=params.encoder,
        encoder_weights=params.encoder_weights,
        in_channels=1,
        classes=1,
        decoder_attention_type=params.attention,
        aux_params={"classes": len(CLASSES), "dropout": params.dropout, "pooling": params.head_pooling},
    )
    if params.pooling == "avg":
        replace_max_pooling(model.encoder)
    if params.deep_supervision:
        model.deep_supervision = DeepSupervision(model.decoder, params.deep_supervision)
    return model


class LesionAwareUnet(smp.Unet):
    """smp's U-Net whose classification head also pools the encoder's features under the predicted lesion, so
    that the class is read from the lesion and its margin rather than from the whole scan (mostly background)."""

    STAGES = 2  # the last two encoder stages: the deepest is 1/32 of the image, too coarse alone for small lesions

    def __init__(self, *args, aux_params: dict, **kwargs):
        super().__init__(*args, aux_params=aux_params, **kwargs)
        channels = sum(self.encoder.out_channels[-self.STAGES:])
        self.classification_head = LesionHead(channels, aux_params["classes"], aux_params["dropout"])

    def forward(self, x):
        features = self.encoder(x)
        mask_logits = self.segmentation_head(self.decoder(features))
        return mask_logits, self.classification_head(features[-self.STAGES:], mask_logits)


class LesionHead(nn.Module):
    """Per stage, the features averaged over the image and averaged under the lesion probability (resized to the
    stage's grid); all concatenated, dropout, one linear layer. The probability is detached: the class loss
    shapes what the head reads, not where the mask is drawn. With no lesion predicted, the lesion pooling is 0."""

    def __init__(self, channels: int, classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.linear = nn.Linear(2 * channels, classes)

    def forward(self, features: list[torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        lesion = torch.sigmoid(mask_logits.detach().float())
        pooled = []
        for feature in features:
            weight = nn.functional.adaptive_avg_pool2d(lesion, feature.shape[-2:]).to(feature.dtype)
            pooled += [feature.mean((2, 3)), (feature * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-3)]
        return self.linear(self.dropout(torch.cat(pooled, 1)))


class DeepSupervision(nn.Module):
    """nnU-Net's deep supervision on an smp U-Net: a 1x1 lesion head on each of the `stages` decoder blocks before
    the last (finest first: 1/2, 1/4, ... of the image), which the loss scores against the downsampled mask, so that
    the coarse stages learn where the lesion is rather than only pass features on. Forward hooks keep the blocks'
    outputs as smp's decoder computes them (its forward runs unchanged), in training mode only: inference reads the
    last block alone, as without deep supervision. The hooks are bound methods, so a copy of the network (the EMA's)
    keeps into its own copy."""

    def __init__(self, decoder: nn.Module, stages: int):
        super().__init__()
        blocks = list(decoder.blocks)[-1 - stages : -1][::-1]
        self.heads = nn.ModuleList(nn.Conv2d(block.conv2[0].out_channels, 1, kernel_size=1) for block in blocks)
        self.kept: list[torch.Tensor | None] = [None] * stages
        for index, block in enumerate(blocks):
            block.register_forward_hook(partial(self.keep, index))

    def keep(self, index: int, block: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.training:
            self.kept[index] = output

    def logits(self) -> list[torch.Tensor]:
        """The heads' lesion logits of the last forward pass in training mode (finest first), then forgotten."""
        kept, self.kept = self.kept, [None] * len(self.heads)
        return [head(features) for head, features in zip(self.heads, kept, strict=True) if features is not None]


def coarse_mask_logits(model: nn.Module) -> list[torch.Tensor]:
    """The deep supervision's lesion logits of `model`'s last training forward pass; [] without it or in eval."""
    supervision = getattr(model, "deep_supervision", None)
    return supervision.logits() if isinstance(supervision, DeepSupervision) else []


def check_encoder(name: str) -> None:
    if name.startswith("tu-"):
        import timm

        if timm.list_models(name.removeprefix("tu-")):
            return
        close = difflib.get_close_matches(name.removeprefix("tu-"), timm.list_models(), n=3)
        close = [f"tu-{c}" for c in close]
    elif name in encoder_names():
        return
    else:
        close = difflib.get_close_matches(name, encoder_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see smp's encoder list, or tu-<timm name>)"
    raise BusiError(f"params.yaml: model.encoder: unknown encoder {name!r}{hint}")


def check_hub_reachable(weights: str) -> None:
    """smp downloads pretrained weights from the Hugging Face hub: say so at once when it is out of reach."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # the user filled the hub cache beforehand
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as err:
        raise BusiError(
            f"params.yaml: model.encoder_weights: {weights!r} weights come from the Hugging Face hub, which is "
            f"unreachable ({err}); set model.encoder_weights: null, or fill the hub cache and set HF_HUB_OFFLINE=1"
        ) from None


def replace_max_pooling(module: nn.Module) -> None:
    """Swap every max-pooling layer for average pooling of the same geometry (as the study did)."""
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                               ceil_mode=child.ceil_mode))
        else:
            replace_max_pooling(child)
