"""Does the shape of the predicted lesion tell the class? A screen of "the mask informs the class" on a
cross-validated recipe's out-of-fold (OOF) predictions, before any network is retrained.

    PYTHONPATH=src python bench/shape_stacker.py cv50/crop [--data data/processed] [--splits data/splits.csv]

Radiologists read a mass's shape (BI-RADS: irregular, not parallel to the skin, i.e. taller than wide, with an
angular margin -> suspicious). The recipe's class probabilities (the head's, calibrated, with the crop network's
say) never see the mask's outline. This stacks them with the outline of the largest region of the fold
network's lesion map: a multinomial logistic regression, fitted on four folds' OOF rows and applied to the fifth
(nested, so no image is scored by a model that saw it), on

- probs: log p(benign), log p(malignant), log p(normal) of `<cv>/oof_per_image.csv`;
- shape: whether a lesion is drawn, the map's highest probability and its mean inside the region, the region's
  share of the image (log), its count of regions, extent (area / box), solidity (area / convex hull), compactness
  (4 pi area / perimeter^2), height / width (log), the depth of its centre.

It writes `<cv>/stacked_<features>/oof_per_image.csv` for each feature set (probs alone: a recalibration, the
control; probs + shape: the lever), the recipe's masks gated by the stacked class (normal -> empty), so that
`bench/paired.py` compares them with the recipe's own table on the same scans. Fold networks draw their held-out
images' maps again (`<cv>/folds/fold-<k>/best.pt`, about 20 s on a CPU, without flip TTA).
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, spatial

from busi import CLASSES
from busi.data.arrays import load_split
from busi.model.postprocessing import regions, softmax
from busi.model.predictor import Predictor
from busi.stages.cross_validate import concatenate, folds_of

SHAPE = ("drawn", "highest", "mean_inside", "log_share", "regions", "extent", "solidity", "compactness",
         "log_height_width", "depth")
PENALTY = 1.0  # L2 on the standardised weights, as scikit-learn's C = 1: fixed beforehand, not tuned here


def outline(probability: np.ndarray) -> dict:
    """Shape features of the largest region of a lesion map thresholded at 0.5 (zeros where none)."""
    mask = probability >= 0.5
    labelled, areas = regions(mask)
    features = dict.fromkeys(SHAPE, 0.0) | {"highest": float(probability.max())}
    if not len(areas):
        return features
    region = labelled == 1 + int(np.argmax(areas))
    rows, cols = np.nonzero(region)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    area = float(region.sum())
    edge = region & ~ndimage.binary_erosion(region)
    points = np.column_stack([rows, cols]).astype(float)
    corners = np.concatenate([points + offset for offset in ((0, 0), (0, 1), (1, 0), (1, 1))])
    hull = spatial.ConvexHull(corners).volume  # of the pixels' corners: a 1-pixel region has area 1
    return features | {
        "drawn": 1.0, "mean_inside": float(probability[region].mean()), "log_share": np.log(area / mask.size),
        "regions": float(len(areas)), "extent": area / (height * width), "solidity": area / hull,
        "compactness": 4 * np.pi * area / max(edge.sum(), 1) ** 2, "log_height_width": np.log(height / width),
        "depth": rows.mean() / mask.shape[0]}


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty: (mean, scale, weights [features + 1, classes])."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    onehot = np.eye(len(CLASSES))[y]

    def loss(flat):
        w = flat.reshape(z.shape[1], len(CLASSES))
        logits = z @ w
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        penalty = (w[:-1] ** 2).sum() / (2 * PENALTY * len(z))
        gradient = z.T @ (np.exp(log_p) - onehot) / len(z)
        gradient[:-1] += w[:-1] / (PENALTY * len(z))
        return -(onehot * log_p).sum(1).mean() + penalty, gradient.ravel()

    result = optimize.minimize(loss, np.zeros(z.shape[1] * len(CLASSES)), jac=True, method="L-BFGS-B")
    return mean, scale, result.x.reshape(z.shape[1], len(CLASSES))


def predict(model, x: np.ndarray) -> np.ndarray:
    mean, scale, w = model
    return softmax(np.column_stack([(x - mean) / scale, np.ones(len(x))]) @ w)


def gated(cases: pd.DataFrame, p: np.ndarray) -> pd.DataFrame:
    """The recipe's per-image table with the stacked class and probabilities, the mask emptied where the class
    is normal (a lesion image loses its Dice; a normal image no longer has a lesion drawn)."""
    out = cases.copy()
    out[[f"p_{name}" for name in CLASSES]] = p
    out["predicted_label"] = np.array(CLASSES)[p.argmax(1)]
    emptied = (out["predicted_label"] == "normal") & (out["predicted_area_px"] > 0)
    out.loc[emptied, "fp"] = 0
    out.loc[emptied, "tn"] = out.loc[emptied, ["tp", "fp", "fn", "tn"]].sum(axis=1) - out.loc[emptied, "lesion_area_px"]
    out.loc[emptied, "fn"] = out.loc[emptied, "lesion_area_px"]
    out.loc[emptied, ["tp", "predicted_area_px", "dice", "iou"]] = 0
    out.loc[emptied & (out["label"] == "normal"), ["dice", "iou"]] = 1.0  # empty on empty, as the metrics score it
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv", type=Path, help="a busi cross-validate output folder")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    args = parser.parse_args()

    cases = pd.read_csv(args.cv / "oof_per_image.csv", dtype={"image_id": str})
    pool = concatenate(load_split(args.data, "train"), load_split(args.data, "val"))
    fold_of = pd.Series(folds_of(pool["ids"], args.splits), index=pool["ids"])
    shapes = {}
    for fold in sorted(set(fold_of)):
        held = (fold_of == fold).to_numpy()
        predictor = Predictor.from_checkpoints([args.cv / "folds" / f"fold-{fold}" / "best.pt"])
        maps, _ = predictor.probabilities(pool["images"][held], flip=False)
        shapes |= {image_id: outline(m) for image_id, m in zip(pool["ids"][held], maps, strict=True)}
    shape = pd.DataFrame.from_dict(shapes, orient="index").loc[cases["image_id"], list(SHAPE)].to_numpy()
    probs = np.log(np.clip(cases[[f"p_{name}" for name in CLASSES]].to_numpy(float), 1e-6, 1))
    y = cases["label"].map(CLASSES.index).to_numpy()
    folds = fold_of.loc[cases["image_id"]].to_numpy()

    for name, x in {"probs": probs, "probs_shape": np.column_stack([probs, shape])}.items():
        stacked = np.zeros((len(x), len(CLASSES)))
        for fold in sorted(set(folds)):
            stacked[folds == fold] = predict(fit(x[folds != fold], y[folds != fold]), x[folds == fold])
        out = args.cv / f"stacked_{name}"
        out.mkdir(exist_ok=True)
        gated(cases, stacked).to_csv(out / "oof_per_image.csv", index=False)
        weights = fit(x, y)[2][:-1]
        print(f"{out / 'oof_per_image.csv'}: weights on all folds (standardised features x {'/'.join(CLASSES)}):")
        for feature, row in zip([f"log_p_{c}" for c in CLASSES] + list(SHAPE)[: x.shape[1] - 3], weights,
                                strict=True):
            print(f"  {feature:>18} " + " ".join(f"{v:+.2f}" for v in row))


if __name__ == "__main__":
    main()
