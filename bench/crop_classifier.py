"""Screen of issue 19's "classifier that sees the lesion": a second, small network that tells benign from
malignant on the crop around the lesion, cut from the original image (the lesion centred at one scale, where
the U-Net sees the whole image squeezed to 128 px), judged on out-of-fold predictions.

    PYTHONPATH=src python bench/crop_classifier.py CV_DIR --out crops [--size 128] [--epochs 40]

CV_DIR is a finished `busi cross-validate --out` folder (its folds' networks, `oof_per_image.csv` and the
post-processing its predictor chose). For each fold, a timm ResNet-18 (one channel, from scratch) learns benign
against malignant on the reference-mask crops of the other folds' lesion images (the box grown by a random margin,
shifted, mirrored, brightness and contrast jittered); then the fold's own U-Net draws the held-out images' masks,
and every image with a predicted lesion has the crop around its largest region classified (with its mirror image).
The class head's split of the lesion probability between benign and malignant is averaged with the crop network's;
the normal probability and every mask are unchanged, so the label changes only between benign and malignant. Writes
`<out>/oof_per_image.csv` (the columns of CV_DIR's) and prints both OOF figures with 95% intervals, confusions and
the paired differences.

With --normal-class the crop network learns a third class, normal, on crops of the training folds' normal images
(half the time around a region a U-Net draws there, where it draws one; else a random box of a lesion's relative
size), and the rule "the crop network calls the drawn lesion normal with probability above t: empty the mask, call
the image normal" is scored for t from 0.5 to 0.95 on the images with a lesion drawn, paired against the same OOF
without the rule. Which U-Net draws the regions (--negatives): `fold`, the fold's own, which has trained on those
images and rarely errs there; `oof`, the U-Net that held each image out (another fold's), so the crop network learns
from the false lesions a U-Net draws on images it has not seen, as it will meet them; `likeliest`, the fold's own
U-Net's likeliest region on every training normal image, drawn or not (the largest region at half its map's
highest probability), which a single model's training could also have.
Where CV_DIR's predictor already has a crop network (its crop weight above 0), its OOF is kept as it is: the rule is
the only change. About 19 minutes on a 2-core CPU in fp32 at the defaults (5 folds x 427 crops x 40 epochs at
128 px), about half that in bf16 where the CPU runs it natively.
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import timm
import torch
from torch.nn import functional as F

from busi import CLASSES, autocast_dtype
from busi.data.arrays import load_split
from busi.evaluation.metrics import bootstrap_ci, keys, paired_bootstrap, value
from busi.model.checkpoint import load_checkpoint
from busi.model.postprocessing import PostProcessing, mask_from_label
from busi.stages.cross_validate import concatenate, folds_of

BENIGN, MALIGNANT, NORMAL = (CLASSES.index(name) for name in ("benign", "malignant", "normal"))


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def cut(image: np.ndarray, box, size: int, margin: float, shift=(0.0, 0.0)) -> np.ndarray:
    """The square around `box` grown by `margin` of its longer side each way, at `size` px (zeros outside)."""
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    half = max(side / 2, 8)
    cy, cx = (y0 + y1) / 2 + shift[0] * side, (x0 + x1) / 2 + shift[1] * side
    corners = np.float32([[cx - half, cy - half], [cx + half, cy - half], [cx - half, cy + half]])
    to = cv2.getAffineTransform(corners, np.float32([[0, 0], [size, 0], [0, size]]))
    return cv2.warpAffine(image, to, (size, size), flags=cv2.INTER_AREA if 2 * half > size else cv2.INTER_LINEAR)


def largest_region(probability: np.ndarray, height: int, width: int, min_area: float):
    """The box of the largest lesion region the project's post-processing draws at the image's size (threshold
    0.5, regions under `min_area` of the image dropped), or None when it draws none."""
    mask = PostProcessing(min_lesion_area=min_area, largest_component=True).mask(probability, height, width)
    return box_of(mask) if mask.any() else None


def regions_of(unet: torch.nn.Module, images: np.ndarray, originals: list, min_area: float,
               likeliest: bool = False) -> list:
    """The box of the largest region `unet` draws on each of `images` (at the training size) at its original's
    size, or None; `likeliest`: the largest region at half the map's highest probability instead, drawn on every
    image (as the post-processing draws a lesion class's mask where nothing reached the threshold)."""
    with torch.no_grad():
        maps = torch.sigmoid(unet(torch.from_numpy(images).unsqueeze(1).float() / 255)[0])[:, 0].numpy()
    if likeliest:
        return [box_of(mask_from_label(np.zeros(image.shape, bool), p, BENIGN, True))
                for p, image in zip(maps, originals, strict=True)]
    return [largest_region(p, *image.shape, min_area) for p, image in zip(maps, originals, strict=True)]


def normal_box(image: np.ndarray, lesion_boxes: list, shapes: list, false_box, rng) -> tuple[int, int, int, int]:
    """A normal image's training box: the U-Net's false region half the time (where it drew one), else a random
    box with the relative size of a random training lesion's."""
    if false_box is not None and rng.random() < 0.5:
        return false_box
    j = rng.integers(len(lesion_boxes))
    (y0, y1, x0, x1), (h, w) = lesion_boxes[j], shapes[j]
    bh, bw = max(8, int((y1 - y0) / h * image.shape[0])), max(8, int((x1 - x0) / w * image.shape[1]))
    y, x = rng.integers(0, max(1, image.shape[0] - bh)), rng.integers(0, max(1, image.shape[1] - bw))
    return y, y + bh, x, x + bw


def train_crops(images, boxes, labels, args, seed: int, false_boxes: dict | None = None) -> torch.nn.Module:
    """benign (0) against malignant (1), and normal (2) with --normal-class (`boxes` None for normal images,
    `false_boxes` the U-Net's regions on them); class-weighted cross-entropy, one-cycle schedule."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    classes = 3 if args.normal_class else 2
    network = timm.create_model("resnet18", in_chans=1, num_classes=classes, pretrained=False)
    target = np.where(labels == NORMAL, 2, (labels == MALIGNANT).astype(np.int64)).astype(np.int64)
    lesions = [i for i in range(len(labels)) if labels[i] != NORMAL]
    lesion_boxes, shapes = [boxes[i] for i in lesions], [images[i].shape for i in lesions]
    weight = torch.tensor(len(target) / (classes * np.bincount(target, minlength=classes)), dtype=torch.float32)
    batches = int(np.ceil(len(images) / args.batch))
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * batches, pct_start=0.1)
    amp = autocast_dtype("auto", torch.device("cpu"))
    network.train()
    for _ in range(args.epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(order), args.batch):
            batch = order[start : start + args.batch]
            crops = []
            for i in batch:
                box = boxes[i] if labels[i] != NORMAL else normal_box(images[i], lesion_boxes, shapes,
                                                                       (false_boxes or {}).get(i), rng)
                crop = cut(images[i], box, args.size, rng.uniform(0.2, 0.9), rng.uniform(-0.1, 0.1, 2))
                crop = crop[:, ::-1] if rng.random() < 0.5 else crop
                crops.append(np.clip(crop / 255 * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1))
            x = torch.from_numpy(np.stack(crops)[:, None].astype(np.float32))
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):  # bf16 where the CPU runs it natively
                logits = network(x)
            loss = F.cross_entropy(logits.float(), torch.from_numpy(target[batch]), weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return network.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--margin", type=float, default=0.5, help="the crop's margin at prediction")
    parser.add_argument("--min-area", type=float, help="smallest predicted region (default: the CV's chosen)")
    parser.add_argument("--normal-class", action="store_true", help="a third class: normal (see above)")
    parser.add_argument("--negatives", choices=("fold", "likeliest", "oof"), default="fold",
                        help="whose regions on the normal images the normal class learns from (see above)")
    args = parser.parse_args()
    started = time.perf_counter()
    chosen = json.loads((args.cv / "predictor" / "predictor.json").read_text())["postprocessing"]
    if args.min_area is None:  # the smallest lesion area the cross-validation chose on its OOF predictions
        args.min_area = chosen["min_lesion_area"]

    pool = concatenate(load_split(args.data / "processed", "train"), load_split(args.data / "processed", "val"))
    fold_of = folds_of(pool["ids"], args.data / "splits.csv")
    sources = pd.read_csv(args.data / "raw" / "cases.csv", dtype={"image_id": str}).set_index("image_id")["image"]
    originals = [cv2.imread(str(args.data / "raw" / sources[i]), cv2.IMREAD_GRAYSCALE) for i in pool["ids"]]
    references = [cv2.imread(str(args.data / "masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 0 for i in pool["ids"]]
    labels = pool["labels"]
    malignant = np.full(len(labels), np.nan)  # the crop network's malignant probability, where a lesion is drawn
    normal = np.full(len(labels), np.nan)  # its normal probability (--normal-class)
    unets = {fold: load_checkpoint(args.cv / "folds" / f"fold-{fold}")[0] for fold in sorted(set(fold_of))}
    oof_boxes = {}  # each image's largest region drawn by the U-Net that held it out (None: none drawn)
    for fold, unet in unets.items():
        held = np.nonzero(fold_of == fold)[0]
        oof_boxes |= dict(zip(held, regions_of(unet, pool["images"][held], [originals[i] for i in held], args.min_area),
                              strict=True))
    for fold, unet in unets.items():
        train = [i for i in np.nonzero(fold_of != fold)[0] if labels[i] != NORMAL or args.normal_class]
        false_boxes = {}  # a U-Net's regions on the training normal images, by position in `train`
        if args.normal_class:
            normals = [k for k, i in enumerate(train) if labels[i] == NORMAL]
            boxes = ([oof_boxes[train[k]] for k in normals] if args.negatives == "oof" else
                     regions_of(unet, pool["images"][[train[k] for k in normals]],
                                [originals[train[k]] for k in normals], args.min_area,
                                likeliest=args.negatives == "likeliest"))
            false_boxes = {k: box for k, box in zip(normals, boxes, strict=True) if box is not None}
            print(f"fold {fold}: a region drawn ({args.negatives}) on {len(false_boxes)} of {len(normals)} training "
                  "normal images")
        network = train_crops([originals[i] for i in train],
                              [box_of(references[i]) if labels[i] != NORMAL else None for i in train], labels[train],
                              args, seed=42 + fold, false_boxes=false_boxes)
        held = np.nonzero(fold_of == fold)[0]
        drawn = [i for i in held if oof_boxes[i] is not None]
        crops = [cut(originals[i], oof_boxes[i], args.size, args.margin).astype(np.float32) / 255 for i in drawn]
        with torch.no_grad():
            x = torch.from_numpy(np.stack(crops)[:, None])
            p = ((F.softmax(network(x), 1) + F.softmax(network(x.flip(3)), 1)) / 2).numpy()
            malignant[drawn] = p[:, 1] / (p[:, 0] + p[:, 1])
            if args.normal_class:
                normal[drawn] = p[:, 2]
        print(f"fold {fold}: {len(train)} training crops, {len(drawn)} of {len(held)} held-out images with a lesion "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    old = pd.read_csv(args.cv / "oof_per_image.csv", dtype={"image_id": str}).set_index("image_id").loc[pool["ids"]]
    new = old.copy()
    if chosen.get("crop_weight", 0) > 0:  # the CV's own crop network has had its say in its OOF already
        print(f"{args.cv}: its predictor has a crop network (weight {chosen['crop_weight']}): its OOF is kept")
    say = np.full(len(labels), np.nan) if chosen.get("crop_weight", 0) > 0 else malignant
    lesion_mass = (old["p_benign"] + old["p_malignant"]).clip(lower=1e-12)
    head = old["p_malignant"] / lesion_mass
    share = np.where(np.isnan(say), head, (head + say) / 2)
    new["p_malignant"], new["p_benign"] = lesion_mass * share, lesion_mass * (1 - share)
    lesion_called = old["predicted_label"] != "normal"
    new.loc[lesion_called, "predicted_label"] = np.where(share > 0.5, "malignant", "benign")[lesion_called]
    args.out.mkdir(parents=True, exist_ok=True)
    new.reset_index().to_csv(args.out / "oof_per_image.csv", index=False)
    print(f"\n{np.count_nonzero(~np.isnan(malignant))} images cropped, {np.count_nonzero(old['predicted_area_px'])} "
          f"with a lesion in {args.cv / 'oof_per_image.csv'} (the same images, unless a threshold tie)")
    report(new.reset_index(), old.reset_index(), ~np.isnan(malignant) & (labels != NORMAL))
    if args.normal_class:
        normal_rule(new, normal)
    print(f"{time.perf_counter() - started:.0f} s")


def normal_rule(cases: pd.DataFrame, normal: np.ndarray) -> None:
    """Where a lesion is drawn and the crop network calls it normal above t: the mask emptied, the image called
    normal; paired against `cases` (the crop network's malignant say only)."""
    for t in (0.5, 0.7, 0.8, 0.9, 0.95):
        fire = (np.nan_to_num(normal) > t) & (cases["predicted_area_px"].to_numpy() > 0)
        gated = cases.copy()
        gated.loc[fire, ["tp", "fp", "predicted_area_px"]] = 0
        gated.loc[fire, "fn"] = cases.loc[fire, "lesion_area_px"]
        gated.loc[fire, "tn"] = (cases[["tp", "fp", "fn", "tn"]].sum(axis=1) - cases["lesion_area_px"])[fire]
        for column in ("dice", "iou"):
            gated.loc[fire, column] = np.where(cases.loc[fire, "lesion_area_px"] > 0, 0.0, np.nan)
        gated.loc[fire, "predicted_label"] = "normal"
        comparison = paired_bootstrap(gated.reset_index(), cases.reset_index(), 2000, 0)
        print(f"t {t}: fires on {cases.loc[fire, 'label'].value_counts().to_dict()}; " + ", ".join(
            f"{key} {value(gated.reset_index(), key):.3f} ({c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}])"
            for key, c in comparison.items()))


def report(new: pd.DataFrame, old: pd.DataFrame, cropped: np.ndarray) -> None:
    """The OOF figures of both with 95% intervals, their paired differences, confusions, and the AUC on the
    lesion images that were cropped."""
    for name, cases in (("crop network + head", new), ("head alone", old)):
        intervals = bootstrap_ci(cases, 2000, 0)
        print(f"{name}: " + ", ".join(
            f"{key} {value(cases, key):.3f}" + (f" [{intervals[key]['low']:.3f}, {intervals[key]['high']:.3f}]"
                                                 if key in intervals else "")
            for key in ("f1_weighted", "dice_per_image", "auc_malignant_vs_benign", "normal_fp_rate", "ece")))
        print(pd.crosstab(cases["label"], cases["predicted_label"]).to_string())
        print(f"  malignant AUC on the {cropped.sum()} cropped lesion images: "
              f"{value(cases[cropped], 'auc_malignant_vs_benign'):.3f}")
    print("paired, crop network + head against the head alone (2,000 resamples of the same images):")
    comparison = paired_bootstrap(new, old, 2000, 0)
    for name in [*keys("paired"), "ece"]:
        line = f"{name}: {value(new, name):.3f} against {value(old, name):.3f}"
        if name in comparison:
            c = comparison[name]
            line += f", paired {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], p {c['p']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
