"""One factory for every model: a segmentation_models_pytorch U-Net with one input channel, optional
scSE attention in the decoder and a normal/benign/malignant classification head."""

import difflib
import os
import socket

import segmentation_models_pytorch as smp
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
    model = smp.Unet(
        encoder_name=params.encoder,
        encoder_weights=params.encoder_weights,
        in_channels=1,
        classes=1,
        decoder_attention_type=params.attention,
        aux_params={"classes": len(CLASSES), "dropout": params.dropout, "pooling": params.head_pooling},
    )
    if params.pooling == "avg":
        replace_max_pooling(model.encoder)
    return model


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
