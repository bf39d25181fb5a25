"""Metrics as pure functions of predicted and reference masks and labels (no files, no model, no MLflow).

`METRICS` lists what every consumer shows, each entry computing itself from the per-image table: the bootstrap
intervals, the paired comparisons, the fold summaries of a cross-validation, `report`'s and `ablate`'s columns
and the CI gate's tolerances all iterate it, so a new metric is one entry here and nowhere else.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from busi import CLASSES


@dataclass(frozen=True)
class Metric:
    key: str  # dotted key in metrics/test.json and metrics/val.json
    title: str
    of: Callable[[pd.DataFrame], float | None]  # its value on a per-image table (CASE_COLUMNS); None: undefined
    interval: bool = False  # a 95% bootstrap interval is computed
    paired: bool = False  # two models are compared on it, image by image (paired bootstrap)
    fold: bool = False  # a cross-validation reports its mean ± sd over the folds
    tolerance: float | None = None  # the CI gate fails when it drops by more (higher is better); None: not gated


def segmentation(key: str, label: str | None = None) -> Callable[[pd.DataFrame], float | None]:
    """A metric of segmentation_metrics, over every image or over those of one class."""
    return lambda cases: segmentation_metrics(cases if label is None else cases[cases["label"] == label]).get(key)


METRICS = [  # the study's four columns first
    Metric("iou", "IoU", segmentation("iou"), interval=True, fold=True, tolerance=0.03),
    Metric("dice", "Dice", segmentation("dice"), interval=True, paired=True, fold=True, tolerance=0.03),
    Metric("pixel_accuracy", "pixel acc.", segmentation("pixel_accuracy"), tolerance=0.01),
    Metric("f1_weighted", "weighted F1", lambda cases: f1_weighted(cases["label"], cases["predicted_label"]),
           interval=True, paired=True, fold=True, tolerance=0.05),
    Metric("dice_per_image", "per-image Dice", segmentation("dice_per_image"), interval=True, paired=True, fold=True,
           tolerance=0.03),
    Metric("accuracy", "accuracy", lambda cases: float((cases["label"] == cases["predicted_label"]).mean()),
           fold=True, tolerance=0.05),
    Metric("auc_malignant_vs_benign", "malignant AUC",  # defined without normal images too
           lambda cases: malignant_vs_benign(cases).get("auc_malignant_vs_benign"), interval=True, paired=True),
    Metric("ece", "ECE", lambda cases: expected_calibration_error(cases), interval=True),  # lower is better
    # ECE is biased upward on few images: what a perfectly calibrated model with these probabilities would show
    Metric("ece_by_chance", "ECE by chance",
           lambda cases: float(np.median(ece_by_chance(cases[PROBABILITY_COLUMNS].to_numpy(float))))),
    Metric("per_class.malignant.dice", "malignant Dice", segmentation("dice", "malignant")),
    Metric("normal_fp_rate", "normal FP rate", segmentation("normal_fp_rate"), paired=True),  # lower is better
]


def keys(flag: str) -> list[str]:
    """The keys of the metrics with `flag` ("interval", "paired", "fold") set, read when needed (not at import)."""
    return [metric.key for metric in METRICS if getattr(metric, flag)]


def value(cases: pd.DataFrame, key: str) -> float:
    """Metric `key` of METRICS on `cases`; NaN where it is undefined (no lesion, one class, no image)."""
    found = next(metric for metric in METRICS if metric.key == key).of(cases) if len(cases) else None
    return np.nan if found is None else float(found)


# The per-image table (metrics/plots/per_image.csv, the MLflow table): the pixel counts and class probabilities
# let every metric be recomputed over any subset of images (bootstrap, paired comparisons). `group`: the scan
# (BUSI's copies and frames of one scan, data/splits.csv) or the patient an image belongs to, its own id where
# none is known: the unit the bootstrap draws, since images of one scan or patient are not independent.
PROBABILITY_COLUMNS = [f"p_{name}" for name in CLASSES]
CASE_COLUMNS = ["image_id", "group", "label", "predicted_label", "dice", "iou", "lesion_area_px", "predicted_area_px",
                "tp", "fp", "fn", "tn", *PROBABILITY_COLUMNS]


def lookup(metrics: dict, key: str):
    """The value at a dotted key, or None."""
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def case_table(ids, labels, predicted_labels, predictions: list[np.ndarray], references: list[np.ndarray],
               class_probabilities: np.ndarray, groups=None) -> pd.DataFrame:
    """One row per image: its group (`groups`, an empty one or None: the image's id), pixel counts, Dice and IoU
    (NaN where reference and prediction are both empty), reference and predicted lesion areas, the class
    probabilities [N,3]. `labels` and `predicted_labels` are class indices."""
    rows = []
    for image_id, label, predicted_label, predicted, reference in zip(ids, labels, predicted_labels, predictions,
                                                                      references, strict=True):
        tp, fp, fn = (np.count_nonzero(m) for m in (predicted & reference, predicted & ~reference,
                                                     ~predicted & reference))
        rows.append({"image_id": str(image_id), "label": CLASSES[label], "predicted_label": CLASSES[predicted_label],
                     "tp": tp, "fp": fp, "fn": fn, "tn": reference.size - tp - fp - fn})
    cases = pd.DataFrame(rows, columns=["image_id", "label", "predicted_label", "tp", "fp", "fn", "tn"])
    groups = [None] * len(cases) if groups is None else list(groups)
    cases.insert(1, "group", [str(group) if group else image_id for group, image_id in
                              zip(groups, cases["image_id"], strict=True)])
    tp, fp, fn = (cases[c].to_numpy(float) for c in ("tp", "fp", "fn"))
    with np.errstate(invalid="ignore"):  # 0/0: both empty
        cases["dice"] = 2 * tp / (2 * tp + fp + fn)
        cases["iou"] = tp / (tp + fp + fn)
    cases["lesion_area_px"] = cases["tp"] + cases["fn"]
    cases["predicted_area_px"] = cases["tp"] + cases["fp"]
    cases[PROBABILITY_COLUMNS] = np.asarray(class_probabilities, dtype=float).reshape(len(cases), len(CLASSES))
    return cases


def summary(cases: pd.DataFrame, class_probabilities: np.ndarray) -> dict:
    """Every metric of one split: segmentation, classification, both per class, and every other top-level entry of
    METRICS (computed by the entry itself)."""
    metrics = {"images": len(cases), **segmentation_metrics(cases),
               **classification_metrics(cases, class_probabilities), "per_class": per_class_metrics(cases)}
    others = {metric.key: value(cases, metric.key) for metric in METRICS
              if "." not in metric.key and metric.key not in metrics}
    return metrics | {key: found for key, found in others.items() if not np.isnan(found)}


def segmentation_metrics(cases: pd.DataFrame) -> dict[str, float]:
    """Pooled IoU, Dice and pixel accuracy over all pixels (as the study); Dice and IoU per image averaged over
    images with a reference lesion; the share of normal images with any predicted lesion. A metric with no case
    to measure (no lesion, no normal image) is left out rather than written as NaN."""
    tp, fp, fn, tn = (int(cases[c].sum()) for c in ("tp", "fp", "fn", "tn"))
    metrics = {"pixel_accuracy": (tp + tn) / (tp + fp + fn + tn)} if len(cases) else {}
    lesion = cases["lesion_area_px"] > 0
    if lesion.any():
        metrics |= {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                    "dice_per_image": cases.loc[lesion, "dice"].mean(),
                    "iou_per_image": cases.loc[lesion, "iou"].mean()}
    if len(cases):  # every image: an empty prediction where there is no lesion scores 1
        metrics["dice_per_image_all"] = cases["dice"].fillna(1.0).mean()
    normal = cases["label"] == "normal"
    if normal.any():
        metrics["normal_fp_rate"] = (cases.loc[normal, "predicted_area_px"] > 0).mean()
    return {key: float(value) for key, value in metrics.items()}


def classification_metrics(cases: pd.DataFrame, class_probabilities: np.ndarray) -> dict:
    """Weighted and macro F1, accuracy, one-vs-rest ROC-AUC of the head's probabilities, the confusion matrix."""
    actual, predicted = cases["label"], cases["predicted_label"]
    metrics = {"f1_weighted": f1_weighted(actual, predicted),
               "f1_macro": f1_score(actual, predicted, average="macro", zero_division=0),
               "accuracy": accuracy_score(actual, predicted)}
    if actual.nunique() == len(CLASSES):  # one-vs-rest AUC is undefined for a class the split lacks
        metrics["roc_auc_ovr"] = roc_auc_score(actual, class_probabilities, multi_class="ovr", labels=list(CLASSES))
    probabilities = dict(zip(PROBABILITY_COLUMNS, np.asarray(class_probabilities, dtype=float).T, strict=True))
    metrics |= malignant_vs_benign(cases.assign(**probabilities))
    metrics["ece"] = expected_calibration_error(cases.assign(**probabilities))
    matrix = confusion_matrix(actual, predicted, labels=list(CLASSES))
    return {**{key: float(value) for key, value in metrics.items()},
            "confusion": {a: {p: int(n) for p, n in zip(CLASSES, row, strict=True)}
                          for a, row in zip(CLASSES, matrix, strict=True)}}


def malignant_vs_benign(cases: pd.DataFrame) -> dict[str, float]:
    """The binary question on the images labelled benign or malignant (defined with or without normal images,
    so that datasets without them compare): ROC-AUC of the head's malignant probability among the two lesion
    classes, and F1 of predicting malignant. Empty unless both classes are present."""
    lesion = cases[cases["label"].isin(["benign", "malignant"])]
    if lesion["label"].nunique() < 2:
        return {}
    malignant = lesion["label"] == "malignant"
    score = lesion["p_malignant"] / (lesion["p_benign"] + lesion["p_malignant"]).clip(lower=1e-12)
    return {"auc_malignant_vs_benign": float(roc_auc_score(malignant, score)),
            "f1_malignant_vs_benign": float(f1_score(malignant, lesion["predicted_label"] == "malignant",
                                                     zero_division=0))}


ECE_BINS = 10


def expected_calibration_error(cases: pd.DataFrame) -> float:
    """Top-label ECE: images binned by the probability of their most probable class (10 equal-width bins); the
    gap between each bin's mean probability and its accuracy, weighted by the bin's share of images."""
    probabilities = cases[PROBABILITY_COLUMNS].to_numpy(float)
    correct = np.asarray(CLASSES)[probabilities.argmax(1)] == cases["label"].to_numpy()
    return calibration_gap(probabilities.max(1), correct)


def calibration_gap(confidence: np.ndarray, correct: np.ndarray) -> float:
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    gaps = [abs(confidence[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
            for b in np.unique(bins)]
    return float(np.sum(gaps))


def ece_by_chance(probabilities: np.ndarray, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """The ECE of `draws` sets of labels drawn from the class probabilities [N, classes] themselves: what a
    perfectly calibrated model with these probabilities shows on N images. ECE is biased upward on few images
    (about 0.07 on 115 test images, 0.03 on 645 OOF ones, at this model's confidence), so a split's ECE reads
    against this, not against 0."""
    probabilities = np.asarray(probabilities, dtype=float)
    cumulative = np.cumsum(probabilities / probabilities.sum(1, keepdims=True), axis=1)
    uniform = np.random.default_rng(seed).random((draws, len(probabilities), 1))
    labels = (uniform > cumulative[None, :, :-1]).sum(2)  # [draws, N]: inverse-CDF sampling
    confidence, correct = probabilities.max(1), labels == probabilities.argmax(1)
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)  # fixed across draws: binned once
    return sum(abs(confidence[bins == b].mean() - correct[:, bins == b].mean(1)) * (bins == b).mean()
               for b in np.unique(bins))


def f1_weighted(actual, predicted) -> float:
    return float(f1_score(actual, predicted, average="weighted", zero_division=0))


def per_class_metrics(cases: pd.DataFrame) -> dict:
    """Segmentation metrics within each class present, and that class's precision, recall and F1 as a prediction
    (a class the images lack, as normal in many external datasets, has no entry: its F1 would read as 0)."""
    precision, recall, f1, _ = precision_recall_fscore_support(cases["label"], cases["predicted_label"],
                                                               labels=list(CLASSES), zero_division=0)
    per_class = {}
    for i, name in enumerate(CLASSES):
        subset = cases[cases["label"] == name]
        if not len(subset):
            continue
        per_class[name] = {"images": len(subset), **segmentation_metrics(subset),
                           "f1": float(f1[i]), "precision": float(precision[i]), "recall": float(recall[i])}
    return per_class


def rows_by_group(cases: pd.DataFrame) -> list[np.ndarray]:
    """The row positions of each group of the per-image table (its `group` column; without one, each image is a
    group of its own, as in tables written before the column existed)."""
    if "group" not in cases:
        return [np.array([i]) for i in range(len(cases))]
    positions = cases.groupby("group", sort=True).indices  # {group: its rows' positions}
    return [positions[group] for group in sorted(positions)]


def draw(rng: np.random.Generator, rows_of: list[np.ndarray]) -> np.ndarray:
    """One bootstrap resample: as many groups as there are, drawn with replacement, each with all its rows."""
    return np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])


def bootstrap_ci(cases: pd.DataFrame, resamples: int, seed: int) -> dict:
    """95% percentile intervals of every `interval` metric over `resamples` draws of the table's groups with
    replacement, each with all its images (pooled metrics are recomputed over each draw's pixels): copies of one
    scan, or images of one patient, are not independent measurements. A metric undefined in a draw skips that
    draw."""
    names = keys("interval")
    if not resamples or not len(cases):
        return {}
    rng, rows_of = np.random.default_rng(seed), rows_by_group(cases)
    draws = []
    for _ in range(resamples):
        sample = cases.iloc[draw(rng, rows_of)]
        draws.append([value(sample, name) for name in names])
    with warnings.catch_warnings():  # an all-NaN column (no lesion at all) gives NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.array(draws), [2.5, 97.5], axis=0)
    return {name: {"low": float(lo), "high": float(hi)}
            for name, lo, hi in zip(names, low, high, strict=True) if np.isfinite(lo)}


def paired_bootstrap(cases_a: pd.DataFrame, cases_b: pd.DataFrame, resamples: int, seed: int) -> dict:
    """Model A minus model B on the same images, for each `paired` metric: the difference, its 95% percentile
    interval over `resamples` draws of A's groups with replacement (as bootstrap_ci; the same draw for both
    models: the pairing), and a two-sided bootstrap p-value (twice the share of draws on the far side of zero, at
    most 1). A difference is beyond noise when its interval excludes zero."""
    a = cases_a.set_index("image_id")
    b = cases_b.set_index("image_id").reindex(a.index)
    if b["label"].isna().any() or len(a) != len(cases_b):
        raise ValueError("paired comparison needs the same images on both sides")
    rng, paired, rows_of = np.random.default_rng(seed), keys("paired"), rows_by_group(a)
    draws = []
    for _ in range(resamples):
        rows = draw(rng, rows_of)
        draws.append([value(a.iloc[rows], name) - value(b.iloc[rows], name) for name in paired])
    draws = np.array(draws, dtype=float).reshape(-1, len(paired))
    out = {}
    for i, name in enumerate(paired):
        column = draws[:, i][np.isfinite(draws[:, i])]
        low, high = np.percentile(column, [2.5, 97.5]) if len(column) else (np.nan, np.nan)
        tail = min((column <= 0).mean(), (column >= 0).mean()) if len(column) else np.nan
        out[name] = {"difference": float(value(a, name) - value(b, name)), "low": float(low),
                     "high": float(high), "p": float(min(1.0, 2 * tail))}
    return out
