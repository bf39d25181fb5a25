"""The predictor: one self-describing model that evaluate, predict and serving all apply the same way.

It holds one or more trained networks (their probabilities are averaged: a fold ensemble is several) and the
post-processing the evaluate stage chose on the validation split. On disk it is a folder, written by the evaluate
stage (`predictor/`) and logged as the MLflow model, in the manner of smp's hub mixin (a config beside the
weights), with nothing to unpickle:

    predictor.json          format, classes, image size, post-processing, and per network its configuration
    network-0.safetensors   the weights of network 0 (safetensors)
    crop-0.safetensors      the crop network's, where it has one (busi.model.crop; its configuration in the json)

An image of any size goes in as 8-bit grayscale; it is resized to the training size (bilinear, as preprocess
does), predicted, and its lesion probability mapped back to the image's own size before the threshold; the crop
network, where there is one, classifies the crop around the lesion drawn, cut from the image as it was handed in.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from busi import CLASSES, BusiError
from busi.config import NetworkConfig
from busi.files import atomic_dir
from busi.model.checkpoint import load_checkpoint, load_network
from busi.model.crop import CropClassifier, crop_classifier
from busi.model.postprocessing import PostProcessing

MANIFEST = "predictor.json"
FORMAT_VERSION = 1
BATCH = 16  # images per forward pass: bounds memory for large requests
MAX_IMAGE_SIZE = 1024  # the training size a manifest may claim: larger would allocate gigabytes per batch


@dataclass
class Prediction:
    mask: np.ndarray  # bool, the image's own (height, width)
    label: str
    probabilities: dict[str, float]  # per class, from the classification head(s)

    def record(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities,
                "lesion_area_px": int(np.count_nonzero(self.mask)),
                "height": int(self.mask.shape[0]), "width": int(self.mask.shape[1])}


@dataclass
class Predictor:
    networks: list[nn.Module]
    configs: list[NetworkConfig]
    postprocessing: PostProcessing = field(default_factory=PostProcessing)
    provenance: dict = field(default_factory=dict)  # where it came from (checkpoints, epochs, MLflow run)
    crop: CropClassifier | None = None  # the second network on the lesion crop, where the model has one

    def __post_init__(self):
        sizes = {config.image_size for config in self.configs}
        if not self.networks or len(self.networks) != len(self.configs) or len(sizes) != 1:
            raise BusiError(f"a predictor needs networks of one image size, got {len(self.networks)} networks "
                            f"at sizes {sorted(sizes)}")

    @property
    def image_size(self) -> int:
        return self.configs[0].image_size

    def to(self, device: str | torch.device) -> "Predictor":
        for network in self.networks:
            network.to(device)
        if self.crop is not None:
            self.crop.to(device)
        return self

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, flip: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lesion probabilities [N,S,S] and class probabilities [N,3] of uint8 grayscale images [N,S,S] at the
        training size, averaged over the networks and, with flip TTA (the post-processing's, unless `flip` says),
        over the left-right mirrored images."""
        flip = self.postprocessing.flip_tta if flip is None else flip
        masks, classes = [], []
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).unsqueeze(1).float() / 255
            views = [(batch, False), (batch.flip(3), True)] if flip else [(batch, False)]
            mask_sum, class_sum = 0, 0
            for network in self.networks:
                network.eval()
                device = next(network.parameters()).device
                for view, mirrored in views:
                    mask_logits, class_logits = network(view.to(device).contiguous(memory_format=torch.channels_last))
                    mask_probs = torch.sigmoid(mask_logits.float())
                    mask_sum = mask_sum + (mask_probs.flip(3) if mirrored else mask_probs).cpu()
                    class_sum = class_sum + torch.softmax(class_logits.float(), dim=1).cpu()
            count = len(self.networks) * len(views)
            masks.append((mask_sum / count)[:, 0].numpy())
            classes.append((class_sum / count).numpy())
        if not masks:
            return np.zeros((0, *images.shape[1:]), np.float32), np.zeros((0, len(CLASSES)), np.float32)
        return np.concatenate(masks), np.concatenate(classes)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """An 8-bit grayscale image of any size at the training size, as the preprocess stage resizes it."""
        return cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Mask, label and class probabilities of 8-bit grayscale images of any sizes."""
        if not images:
            return []
        probabilities, class_probabilities = self.probabilities(np.stack([self.resize(image) for image in images]))
        masks, labels, class_probabilities = self.postprocessing.apply(probabilities, class_probabilities,
                                                                       np.array([image.shape for image in images]),
                                                                       self.crops_of(images))
        return [Prediction(mask, CLASSES[label], {name: float(p) for name, p in zip(CLASSES, probs, strict=True)})
                for mask, label, probs in zip(masks, labels, class_probabilities, strict=True)]

    def crops_of(self, images: list[np.ndarray]):
        """What the post-processing calls with the masks it drew on `images` (8-bit grayscale, each at its own
        size): the crop network's malignant probability around each lesion; None without a crop network."""
        if self.crop is None:
            return None
        return lambda masks: self.crop.malignant(images, masks)

    def save(self, folder: Path) -> None:
        """Write the predictor folder atomically (it replaces an earlier one only once complete)."""
        manifest = {"format_version": FORMAT_VERSION, "classes": list(CLASSES), "image_size": self.image_size,
                    "postprocessing": self.postprocessing.to_dict(), "networks": [], "provenance": self.provenance}
        with atomic_dir(folder) as tmp:
            for i, (network, config) in enumerate(zip(self.networks, self.configs, strict=True)):
                weights = f"network-{i}.safetensors"
                save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp / weights)
                manifest["networks"].append({"weights": weights, "model": config.model.model_dump(mode="json")})
            if self.crop is not None:
                manifest["crop"] = {**self.crop.config.model_dump(), "weights": []}
                for i, state in enumerate(self.crop.states()):
                    save_file(state, tmp / f"crop-{i}.safetensors")
                    manifest["crop"]["weights"].append(f"crop-{i}.safetensors")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def from_checkpoints(cls, paths: list[Path], postprocessing: PostProcessing | None = None) -> "Predictor":
        loaded = [load_checkpoint(path) for path in paths]
        provenance = {"checkpoints": [{"path": str(path), "epoch": state.get("epoch")}
                                      for path, (_, _, state) in zip(paths, loaded, strict=True)]}
        return cls([network for network, _, _ in loaded], [config for _, config, _ in loaded],
                   postprocessing or PostProcessing(), provenance)


def is_predictor(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_predictor(path: Path) -> Predictor:
    """A predictor folder (the evaluate stage's `predictor/`); or a training checkpoint (a .pt file, or a folder
    with best.pt), which has no post-processing of its own: the defaults apply (threshold 0.5, nothing else)."""
    path = Path(path)
    if not is_predictor(path):
        if path.is_dir() and not (path / "best.pt").is_file():
            raise BusiError(f"{path}: neither a predictor folder ({MANIFEST}) nor a checkpoint folder (best.pt)")
        return Predictor.from_checkpoints([path])
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest["format_version"] > FORMAT_VERSION:
            raise BusiError(f"{path / MANIFEST}: format {manifest['format_version']} is newer than this busi "
                            f"reads ({FORMAT_VERSION}): upgrade busi")
        if list(manifest["classes"]) != list(CLASSES):
            raise BusiError(f"{path / MANIFEST}: classes {manifest['classes']}, this busi has {list(CLASSES)}")
        postprocessing = PostProcessing.from_dict(manifest["postprocessing"])
        if manifest["image_size"] not in range(32, MAX_IMAGE_SIZE + 1, 32):
            raise ValueError(f"image_size {manifest['image_size']!r} is not a multiple of 32 up to {MAX_IMAGE_SIZE}")
        configs = [NetworkConfig.model_validate({"model": entry["model"], "image_size": manifest["image_size"]},
                                                strict=False) for entry in manifest["networks"]]
        weights = [path / entry["weights"] for entry in manifest["networks"]]
        crop = manifest.get("crop")
        if crop is not None:
            crop = dict(crop)
            names = crop.pop("weights")
            if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
                raise ValueError(f"crop.weights {names!r} is not a list of weights files")
            crop_weights = [path / name for name in names]
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        if isinstance(err, KeyError):
            detail = f"missing field {err.args[0]!r}"
        raise BusiError(f"{path / MANIFEST}: not a valid predictor manifest ({type(err).__name__}: {detail})") from None
    networks = [load_network(config, read_weights(path, file), file) for config, file in zip(configs, weights,
                                                                                            strict=True)]
    if crop is not None:
        crop = crop_classifier(crop, [read_weights(path, file) for file in crop_weights], path / MANIFEST)
    return Predictor(networks, configs, postprocessing, manifest.get("provenance", {}), crop)


def read_weights(folder: Path, file: Path) -> dict:
    """A safetensors file of the predictor folder: inside it, readable, every value finite."""
    if file.parent.resolve() != folder.resolve():  # weights named like ../x stay inside the folder
        raise BusiError(f"{folder / MANIFEST}: weights file {file.name!r} is outside the predictor folder")
    try:
        state = load_file(file)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a truncated file
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise BusiError(f"{file}: cannot read the weights ({detail})") from None
    if not all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point()):
        raise BusiError(f"{file}: the weights hold NaN or infinite values")
    return state


def load_model(model: str) -> Predictor:
    """A predictor folder, a checkpoint folder/file, or an MLflow model URI."""
    if Path(model).exists():
        return load_predictor(Path(model))
    if urlparse(model).scheme:  # models:/..., runs:/..., or any other MLflow artifact URI
        from busi import tracking  # slow to import: only when a URI is given

        with tempfile.TemporaryDirectory(prefix="busi-model-") as tmp:
            return load_predictor(tracking.download_predictor(model, Path(tmp)))
    raise BusiError(f"{model}: no such predictor or checkpoint in {Path.cwd()} (the evaluate stage writes "
                    "predictor/ at the repository root: run from there or give its path), nor an MLflow model URI "
                    "such as models:/...")
