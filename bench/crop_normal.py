"""Screen of issue 19's crop network with a say on normal against lesion, both ways, on the out-of-fold (OOF)
predictions of a finished cross-validation.

    PYTHONPATH=src python bench/crop_normal.py CV_DIR --out crop_normal [--negatives oof|likeliest] [--epochs 40]

The class head calls a lesion image normal about as often as the U-Net draws on a normal image; the crop network
(busi.model.crop) sees only benign against malignant. Here, for each fold, a crop network with a third class,
normal, learns on the fold's training images (bench/crop_classifier.py's training: lesion images around their
reference mask; normal images half the time around the region a U-Net draws there, else a random box), and has
its say wherever the U-Net draws a region on a held-out image, before the class gates the mask: the normal
probability there becomes (1 - w) x the head's + w x the crop network's, benign and malignant sharing the rest as
they did. So an image the head called normal becomes a lesion, keeping the region drawn, where the crop network
sees one; and a drawn region the crop network calls normal is emptied with its image's label.

Which U-Net draws the normal images' regions (--negatives): `oof`, the one that held each image out (another
fold's), as the rule meets false lesions at inference; `likeliest`, the fold's own, its likeliest region on every
training normal image, which a single model's training could also have.

The OOF is recomputed with the project's post-processing (CV_DIR's predictor's choices, its crop network's say
on benign against malignant) and checked against CV_DIR/oof_per_image.csv; w 0 is that OOF. Every w from 0 to 1
is scored on the same images and paired against w 0 (scans resampled). w is chosen here on the OOF it is scored
on: with five values tried, the best one's gain is a little optimistic. Writes `<out>/crop_normal.csv` (each
image's crop normal probability, NaN where no region is drawn) and `<out>/oof_w<w>.csv` per w.
About 25 minutes on a 2-core CPU with bf16 at 40 epochs (five folds, 645 images).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from crop_classifier import cut, regions_of, train_crops  # bench/: the same crops, jitter and schedule
from torch.nn import functional as F

from busi.data.arrays import load_split, read_references
from busi.data.cases import read_originals
from busi.evaluation import metrics
from busi.evaluation.metrics import paired_bootstrap, value
from busi.model.checkpoint import load_checkpoint
from busi.model.crop import box_of, load_crop_checkpoint
from busi.model.postprocessing import BENIGN, MALIGNANT, NORMAL, PostProcessing, average_with_crop, keep_largest_region
from busi.model.predictor import Predictor
from busi.stages.cross_validate import concatenate, folds_of

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHOWN = ("f1_weighted", "dice_per_image", "auc_malignant_vs_benign", "normal_fp_rate", "ece")


def normal_say(class_probabilities: np.ndarray, crop_normal: np.ndarray, weight: float) -> np.ndarray:
    """Where a region is drawn (`crop_normal` not NaN): the normal probability (1 - weight) x the head's + weight x
    the crop network's; benign and malignant share the rest in their proportion."""
    out = np.array(class_probabilities, dtype=float)
    drawn = ~np.isnan(crop_normal)
    normal = (1 - weight) * out[drawn, NORMAL] + weight * crop_normal[drawn]
    lesion = out[drawn][:, [BENIGN, MALIGNANT]]
    lesion = lesion / np.maximum(lesion.sum(1, keepdims=True), 1e-12) * (1 - normal)[:, None]
    out[np.flatnonzero(drawn)[:, None], [BENIGN, MALIGNANT]] = lesion
    out[drawn, NORMAL] = normal
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--negatives", choices=("oof", "likeliest"), default="oof")
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--margin", type=float, default=0.5, help="the crop's margin at prediction")
    args = parser.parse_args()
    args.normal_class = True  # train_crops' switch for the third class
    started = time.perf_counter()
    manifest = json.loads((args.cv / "predictor" / "predictor.json").read_text())
    chosen = PostProcessing.from_dict(manifest["postprocessing"])
    pool = concatenate(load_split(args.data / "processed", "train"), load_split(args.data / "processed", "val"))
    fold_of = folds_of(pool["ids"], args.data / "splits.csv")
    folds = sorted(set(fold_of.tolist()))
    originals = read_originals(args.data / "raw", pool["ids"])
    references = read_references(args.data / "masks", pool)
    labels = pool["labels"]

    # The OOF as the cross-validation made it: each image by the fold that held it out, masks before the gate.
    heads = np.zeros((len(labels), 3))
    masks: list = [None] * len(labels)
    crop_malignant = np.full(len(labels), np.nan)
    maps: list = [None] * len(labels)
    for fold in folds:
        rows = np.flatnonzero(fold_of == fold)
        fold_dir = args.cv / "folds" / f"fold-{fold}"
        fold_maps, heads[rows] = Predictor.from_checkpoints([fold_dir / "best.pt"]).probabilities(
            pool["images"][rows], flip=chosen.flip_tta)
        for i, probability in zip(rows, fold_maps, strict=True):
            masks[i], maps[i] = chosen.mask(probability, *pool["sizes"][i]), probability
        if chosen.crop_weight:
            crop_malignant[rows] = load_crop_checkpoint(fold_dir / "crop.pt")[0].malignant(
                [originals[i] for i in rows], [masks[i] for i in rows])
    class_probabilities = chosen.calibrate(heads)
    if chosen.crop_weight:
        class_probabilities = average_with_crop(class_probabilities, crop_malignant, chosen.crop_weight)
    drawn = np.array([m.any() for m in masks])
    boxes = [box_of(keep_largest_region(m)) if m.any() else None for m in masks]
    print(f"OOF recomputed ({time.perf_counter() - started:.0f} s): a region drawn before the gate on "
          f"{np.count_nonzero(drawn & (labels == NORMAL))} of {np.count_nonzero(labels == NORMAL)} normal images and "
          f"{np.count_nonzero(drawn & (labels != NORMAL))} of {np.count_nonzero(labels != NORMAL)} lesion images",
          flush=True)

    crop_normal = np.full(len(labels), np.nan)
    for fold in folds:
        train = np.flatnonzero(fold_of != fold)
        normals = [k for k, i in enumerate(train) if labels[i] == NORMAL]
        if args.negatives == "oof":
            regions = [boxes[train[k]] for k in normals]
        else:
            unet = load_checkpoint(args.cv / "folds" / f"fold-{fold}")[0]
            regions = regions_of(unet, pool["images"][train[normals]], [originals[train[k]] for k in normals],
                                 chosen.min_lesion_area, likeliest=True)
        false_boxes = {k: box for k, box in zip(normals, regions, strict=True) if box is not None}
        network = train_crops([originals[i] for i in train],
                              [box_of(references[i]) if labels[i] != NORMAL else None for i in train], labels[train],
                              args, seed=42 + fold, false_boxes=false_boxes)
        held = [i for i in np.flatnonzero(fold_of == fold) if drawn[i]]
        x = torch.from_numpy(np.stack([cut(originals[i], boxes[i], args.size, args.margin) for i in held])[:, None]
                             .astype(np.float32) / 255)
        with torch.no_grad():
            p = (F.softmax(network(x), 1) + F.softmax(network(x.flip(3)), 1)) / 2
        crop_normal[held] = p[:, 2].numpy()
        print(f"fold {fold}: {len(train)} training images, {len(false_boxes)} of {len(normals)} normal ones with a "
              f"region ({args.negatives}); {len(held)} held-out images drawn on "
              f"({time.perf_counter() - started:.0f} s)",
              flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": pool["ids"], "label": labels, "crop_normal": crop_normal}).to_csv(
        args.out / "crop_normal.csv", index=False)
    scored = {}
    for weight in WEIGHTS:
        probabilities = normal_say(class_probabilities, crop_normal, weight)
        predicted = chosen.labels(probabilities, np.array([np.count_nonzero(m) for m in masks]))
        gated = masks
        for function, setting in chosen.steps("gate"):
            gated = [function(m, maps[i], predicted[i], setting) for i, m in enumerate(gated)]
        scored[weight] = metrics.case_table(pool["ids"], labels, predicted, gated, references, probabilities,
                                            pool.get("groups"))
        scored[weight].to_csv(args.out / f"oof_w{weight:g}.csv", index=False, float_format="%.6f")
    check(scored[0.0], args.cv / "oof_per_image.csv")
    for weight, cases in scored.items():
        line = ", ".join(f"{key} {value(cases, key):.3f}" for key in SHOWN)
        if weight:
            comparison = paired_bootstrap(cases, scored[0.0], 2000, 0)
            line += "; paired against w 0: " + ", ".join(
                f"{key} {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for key, c in comparison.items())
        changed = cases["predicted_label"] != scored[0.0]["predicted_label"]
        moved = pd.crosstab(cases.loc[changed, "label"], cases.loc[changed, "predicted_label"])
        print(f"w {weight:g}: {line}\n  labels changed (actual -> now): "
              f"{moved.stack().loc[lambda s: s > 0].to_dict() if changed.any() else {}}")
    print(f"{time.perf_counter() - started:.0f} s")


def check(cases: pd.DataFrame, path: Path) -> None:
    """w 0 must be the cross-validation's own OOF, image by image (a threshold tie aside)."""
    theirs = pd.read_csv(path, dtype={"image_id": str}).set_index("image_id").loc[cases["image_id"]]
    same_label = (theirs["predicted_label"].to_numpy() == cases["predicted_label"].to_numpy()).mean()
    same_area = (theirs["predicted_area_px"].to_numpy() == cases["predicted_area_px"].to_numpy()).mean()
    print(f"w 0 against {path}: the same label on {same_label:.1%} of images, the same mask area on {same_area:.1%}")


if __name__ == "__main__":
    main()
