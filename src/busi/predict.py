"""`python -m busi predict`: lesion masks, overlays and class probabilities for your own images.

Each image is read as grayscale, resized to the model's training size (bilinear, as preprocess does), predicted,
and its lesion probability mapped back to the image's own size before the 0.5 threshold. Outputs in --out:
`<stem>_mask.png` (0/255), `<stem>_overlay.png` and one JSON line per image in `predictions.jsonl`.
A file that cannot be read is reported on stderr and skipped; the others are still processed.
"""

import json
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
from PIL import Image
from torch import nn

from busi import CLASSES, BusiError
from busi.config import Params
from busi.dataset import read_gray
from busi.files import atomic_file
from busi.inference import binarize, class_labels, predict_arrays, to_original_size
from busi.model import load_checkpoint

THRESHOLD = 0.5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GROUND_TRUTH = re.compile(r"_mask(_\d+)?$")  # BUSI's mask files sit beside its images: not inputs
TINT = np.array([255, 60, 60], np.float32)  # lesion colour in the overlay (RGB)


def predict(inputs: list[Path], model: str, out_dir: Path, flip_tta: bool = False, largest_component: bool = False,
            label_from_mask: bool = False) -> tuple[int, int]:
    """Predict every image in `inputs` (files, or folders searched recursively); returns (done, failed).
    The flags are the evaluate stage's post-processing (the `postprocessing` of its test.json says which)."""
    out_dir = Path(out_dir)
    paths = find_images(inputs, out_dir)
    net, size = load_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, failed, stems = 0, 0, set()
    with atomic_file(out_dir / "predictions.jsonl") as tmp, tmp.open("w") as lines:
        for path in paths:
            try:
                image = read_image(path)
            except BusiError as err:
                print(f"skipped: {err}", file=sys.stderr)
                failed += 1
                continue
            stem = unique_stem(path.stem, stems)  # a.png and a.jpg, or two folders' 1.png, must not overwrite
            record = predict_image(net, size, image, out_dir, stem, flip_tta, largest_component, label_from_mask)
            lines.write(json.dumps({"path": str(path), **record}) + "\n")
            done += 1
    return done, failed


def load_model(model: str) -> tuple[nn.Module, int]:
    """The network and its training size, from a checkpoint folder/file or an MLflow model URI."""
    if Path(model).exists():
        net, params, _ = load_checkpoint(Path(model))
    elif urlparse(model).scheme:  # models:/..., runs:/..., or any other MLflow artifact URI
        net, params = load_mlflow_model(model)
    else:
        raise BusiError(f"{model}: no such checkpoint file or folder (or MLflow model URI such as models:/...)")
    return net, params.preprocess.image_size


def load_mlflow_model(uri: str) -> tuple[nn.Module, Params]:
    """Download the logged model (busi.tracking.log_model) and load its checkpoint with weights_only=True:
    nothing is unpickled, unlike mlflow.pyfunc.load_model."""
    import mlflow  # slow to import: only when a URI is given

    from busi.tracking import tracking_uri

    with tempfile.TemporaryDirectory(prefix="busi-model-") as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=tracking_uri()))
            # The MLmodel file says where log_model put artifacts["checkpoint"] inside the model folder.
            artifacts = mlflow.models.Model.load(folder).flavors["python_function"]["artifacts"]
            checkpoint = folder / artifacts["checkpoint"]["path"]
        except (mlflow.MlflowException, OSError, KeyError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BusiError(f"{uri}: cannot load a busi model from this MLflow URI ({first_line})") from None
        net, params, _ = load_checkpoint(checkpoint)
    return net, params


def find_images(inputs: list[Path], out_dir: Path) -> list[Path]:
    """Files as given (a non-image is then reported, not silently dropped); folders searched for PNG/JPEG."""
    out_dir = out_dir.resolve()
    paths = []
    for entry in map(Path, inputs):
        if not entry.is_dir():
            paths.append(entry)  # a missing file fails in read_image, with its name
            continue
        found = [
            p for p in sorted(entry.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            and not GROUND_TRUTH.search(p.stem) and out_dir not in p.resolve().parents  # not our own outputs
        ]
        paths.extend(found or [entry])  # an empty folder fails in read_image, as an input that gave nothing
    return paths


def read_image(path: Path) -> np.ndarray:
    """8-bit grayscale, whatever the file's mode."""
    if path.is_dir():
        raise BusiError(f"{path}: no PNG or JPEG images in this folder")
    if not path.is_file():
        raise BusiError(f"{path}: no such file")
    return read_gray(path)


def unique_stem(stem: str, taken: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate)
    return candidate


def predict_image(net: nn.Module, size: int, image: np.ndarray, out_dir: Path, stem: str, flip_tta: bool = False,
                  largest_component: bool = False, label_from_mask: bool = False) -> dict:
    """Write the mask and overlay of one grayscale image; return its JSON record (without the path)."""
    height, width = image.shape
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    probability, class_probs = predict_arrays(net, resized[None], flip=flip_tta)
    mask = binarize(to_original_size(probability[0], height, width), THRESHOLD, largest_component)
    names = {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"}
    save_png(out_dir / names["mask"], mask.astype(np.uint8) * 255)
    save_png(out_dir / names["overlay"], overlay(image, mask))
    probs = {name: float(p) for name, p in zip(CLASSES, class_probs[0], strict=True)}
    label = CLASSES[class_labels(class_probs, np.array([mask.sum()]), label_from_mask)[0]]
    return {"label": label, "probabilities": probs, "lesion_area_px": int(mask.sum()),
            "height": height, "width": width, **names}


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image in RGB, the lesion tinted and outlined."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * TINT
    rgb = rgb.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgb, contours, -1, (255, 255, 0), thickness=max(1, round(min(image.shape) / 200)))
    return rgb


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # the temporary name has no .png suffix
