"""`python -m busi predict`: lesion masks, overlays, labels and class probabilities for your own images.

By default it applies the evaluate stage's predictor (`predictor/`: the trained network and the post-processing
chosen on the validation split), so it gives the same mask and label as the evaluate stage and the served MLflow
model; `--model` may name another predictor folder, an MLflow model URI (models:/..., runs:/...), or a training
checkpoint (which has no post-processing of its own: defaults apply). Flags override single steps, and it prints
what it applied. Each image is read as 8-bit grayscale, resized to the training size (bilinear, as preprocess
does), predicted, and its lesion probability mapped back to the image's own size before the threshold.

Outputs in --out: `<stem>_mask.png` (0/255), `<stem>_overlay.png` (the lesion outlined, the label and class
probabilities written on it) and one JSON line per image in `predictions.jsonl`. A file that cannot be read is
reported on stderr and skipped; the others are still processed.
"""

import json
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from busi import CLASSES, BusiError
from busi.data.images import read_gray
from busi.files import atomic_file
from busi.model.postprocessing import STEPS, PostProcessing
from busi.model.predictor import Prediction, load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GROUND_TRUTH = re.compile(r"_mask(_\d+)?$")  # BUSI's mask files sit beside its images: not inputs
TINT = np.array([255, 60, 60], np.float32)  # lesion colour in the overlay (RGB)


def predict(inputs: list[Path], model: str, out_dir: Path, overrides: dict | None = None) -> tuple[int, int, str]:
    """Predict every image in `inputs` (files, or folders searched recursively); returns (done, failed, what was
    applied). `overrides` replaces post-processing steps of the model's (the threshold, a step of STEPS); None
    values keep the model's."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BusiError(f"{out_dir}: --out names an existing file; give a folder")
    paths = find_images(inputs, out_dir)
    beside_inputs = {real(path).parent for path in paths} | {real(e) for e in inputs if Path(e).is_dir()}
    if out_dir.resolve() in beside_inputs:  # <stem>_mask.png there is BUSI's own name for the reference mask
        raise BusiError(f"{out_dir}: --out is a folder of input images; predictions written there could replace "
                        "the images' reference masks (<name>_mask.png): give another folder")
    predictor = load_model(model)
    changes = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        predictor.postprocessing = PostProcessing.from_dict(predictor.postprocessing.to_dict() | changes)
    except ValueError as err:
        raise BusiError(f"command line: {err}") from None
    source = model + (f"; {', '.join(changes)} from the command line" if changes else "")
    applied = f"{predictor.postprocessing.describe()} (from {source})"
    print(f"predict: {applied}", file=sys.stderr, flush=True)
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
            record = write_prediction(predictor.predict([image])[0], image, out_dir, stem)
            lines.write(json.dumps({"path": str(path), **record}) + "\n")
            done += 1
    return done, failed, applied


def find_images(inputs: list[Path], out_dir: Path) -> list[Path]:
    """Files as given (a non-image is then reported, not silently dropped); folders searched for PNG/JPEG, dead
    links (a loop, a missing target) included so that they are reported too."""
    out_dir = out_dir.resolve()
    paths = []
    for entry in map(Path, inputs):
        if not entry.is_dir():
            paths.append(entry)  # a missing file fails in read_image, with its name
            continue
        found = [
            p for p in sorted(entry.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            and not GROUND_TRUTH.search(p.stem) and out_dir not in real(p).parents  # not ours
        ]
        paths.extend(found or [entry])  # an empty folder fails in read_image, as an input that gave nothing
    return paths


def real(path: Path | str) -> Path:
    """The path with its links followed; unlike Path.resolve, a link loop is no error (read_image reports it)."""
    return Path(os.path.realpath(path))


def read_image(path: Path) -> np.ndarray:
    """8-bit grayscale, whatever the file's mode."""
    if path.is_dir():
        raise BusiError(f"{path}: no PNG or JPEG images in this folder")
    if path.is_symlink() and not path.exists():
        raise BusiError(f"{path}: a link that leads nowhere (a loop or a missing target)")
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


def write_prediction(prediction: Prediction, image: np.ndarray, out_dir: Path, stem: str) -> dict:
    """Write the mask and overlay of one image; return its JSON record (without the path)."""
    names = {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"}
    save_png(out_dir / names["mask"], prediction.mask.astype(np.uint8) * 255)
    save_png(out_dir / names["overlay"], overlay(image, prediction))
    return {**prediction.record(), **names}


def overlay(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    """The image in RGB, the lesion tinted and outlined, the label and class probabilities written on top."""
    mask = prediction.mask
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * TINT
    rgb = rgb.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgb, contours, -1, (255, 255, 0), thickness=max(1, round(min(image.shape) / 200)))
    text = f"{prediction.label}  " + "  ".join(f"{name[0].upper()} {prediction.probabilities[name]:.2f}"
                                               for name in CLASSES)
    scale = max(0.35, min(image.shape) / 900)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(rgb, (0, 0), (min(width + 8, rgb.shape[1]), height + baseline + 8), (0, 0, 0), thickness=-1)
    cv2.putText(rgb, text, (4, height + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # the temporary name has no .png suffix


def run(args, params) -> str:
    overrides = {"threshold": args.threshold} | {step.name: getattr(args, step.name) for step in STEPS}
    done, failed, _ = predict(args.inputs, args.model, args.out, overrides)
    if failed:
        raise BusiError(f"{failed} of {done + failed} inputs failed (see above); the rest are in {args.out}")
    return f"{done} images in {args.out}"
