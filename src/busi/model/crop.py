"""The crop network: a second, small classifier that sees the lesion up close. The U-Net looks at the whole
image squeezed to the training size; this network looks at the square around the lesion cut from the original
image (the lesion's box grown by `margin` of its longer side each way, at `size` px), so every lesion is seen
centred and at one scale. A timm ResNet-18 with one input channel, from scratch.

It classifies the crop around the largest region of the mask the post-processing drew; the post-processing
(busi.model.postprocessing, step `crop_weight`) averages its malignant probability with the class head's.
Trained by busi.crop_training on the reference masks of the training split.
"""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from pydantic import ValidationError
from torch import nn

from busi import BusiError
from busi.config import CropConfig
from busi.files import atomic_file
from busi.model.postprocessing import keep_largest_region

BATCH = 32  # crops per forward pass


def build_crop_network() -> nn.Module:
    """benign (0) against malignant (1) logits of [N,1,S,S] crops in [0, 1]."""
    return timm.create_model("resnet18", in_chans=1, num_classes=2, pretrained=False)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a non-empty mask's pixels, bottom and right exclusive."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def cut(image: np.ndarray, box: tuple[int, int, int, int], size: int, margin: float,
        shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The square around `box` grown by `margin` of its longer side each way (its centre moved by `shift`
    of its side), zeros outside the image, resized to `size` px. Cut at the image's own scale and then resized
    with area averaging when shrinking, so a large lesion's crop is smoothed rather than aliased."""
    top, bottom, left, right = box
    side = max(16, round(max(bottom - top, right - left) * (1 + 2 * margin)))
    y0 = round((top + bottom) / 2 + shift[0] * side - side / 2)
    x0 = round((left + right) / 2 + shift[1] * side - side / 2)
    window = np.zeros((side, side), np.uint8)
    ys, xs = slice(max(y0, 0), min(y0 + side, image.shape[0])), slice(max(x0, 0), min(x0 + side, image.shape[1]))
    if ys.stop > ys.start and xs.stop > xs.start:
        window[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[ys, xs]
    return cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


@dataclass
class CropClassifier:
    networks: list[nn.Module]  # one, or a fold ensemble's (their probabilities averaged)
    config: CropConfig  # size and margin only (a CropParams' training settings stay with the training)

    @torch.no_grad()
    def malignant(self, images: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        """The malignant probability (against benign) of the crop around each mask's largest region, averaged
        over the networks and with the crop's mirror image; NaN where the mask is empty."""
        shares = np.full(len(images), np.nan)
        drawn = [i for i, mask in enumerate(masks) if mask.any()]
        crops = np.stack([cut(images[i], box_of(keep_largest_region(masks[i])), self.config.size,
                              self.config.margin) for i in drawn]) if drawn else np.zeros((0, 1, 1), np.uint8)
        for start in range(0, len(drawn), BATCH):
            total = 0
            for network in self.networks:
                network.eval()
                x = torch.from_numpy(crops[start : start + BATCH]).unsqueeze(1).float().div(255)
                x = x.to(next(network.parameters()).device)
                total = total + torch.softmax(network(x).float(), 1) + torch.softmax(network(x.flip(3)).float(), 1)
            shares[drawn[start : start + BATCH]] = (total / (2 * len(self.networks)))[:, 1].cpu().numpy()
        return shares

    def to(self, device: str | torch.device) -> "CropClassifier":
        for network in self.networks:
            network.to(device)
        return self

    def states(self) -> list[dict]:
        return [{k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
                for network in self.networks]


def crop_classifier(config: dict, weights: list[dict], source: Path | str) -> CropClassifier:
    """A crop network (or an ensemble of them) from its configuration and weights; anything wrong is one
    BusiError naming `source`."""
    try:
        config = CropConfig.model_validate(config, strict=False)
    except ValidationError as err:
        first = err.errors()[0]
        raise BusiError(f"{source}: invalid crop network configuration: {'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}") from None
    networks = []
    for state in weights:
        network = build_crop_network()
        try:
            network.load_state_dict(state)
        except (RuntimeError, TypeError) as err:
            detail = " ".join(str(err).split())[:300]
            raise BusiError(f"{source}: the weights do not fit the crop network ({detail})") from None
        networks.append(network.eval())
    return CropClassifier(networks, config)


def save_crop_checkpoint(path: Path, classifier: CropClassifier, **extra) -> None:
    """The crop stage's output: one network's weights + configuration (+ what the training says in `extra`),
    written atomically."""
    with atomic_file(path) as tmp:
        torch.save({"model": classifier.states()[0], "config": classifier.config.model_dump(), **extra}, tmp)


def load_crop_checkpoint(path: Path) -> tuple[CropClassifier, dict]:
    """The crop network and everything saved beside it; read with weights_only=True: nothing is unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BusiError(f"{path}: no such crop network; run `dvc repro train_crop`") from None
    except Exception as err:  # noqa: BLE001 - any file may be handed in
        raise BusiError(f"{path}: not a readable crop network checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise BusiError(f"{path}: not a crop network checkpoint (no configuration beside the weights)")
    return crop_classifier(state["config"], [state["model"]], path), state
