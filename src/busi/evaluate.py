"""Stage evaluate: the trained model on the test split, scored at each image's original resolution.

Segmentation (pooled over pixels, as the study, and per image), classification, the same per class, bootstrap
confidence intervals; DVC plots (confusion matrix, per-image table), the study's Figures 1 and 2, and everything
logged to the training's own MLflow run. Post-processing is chosen on the validation split, never on test.
"""

import json
import warnings
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state
from matplotlib.ticker import MaxNLocator
from mlflow.exceptions import MlflowException
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from busi import CLASSES, BusiError, tracking
from busi.config import EvaluateParams
from busi.data import load_split
from busi.files import atomic_file
from busi.inference import binarize, class_labels, predict_arrays, to_original_size
from busi.model import load_checkpoint

PER_IMAGE_COLUMNS = ["image_id", "label", "predicted_label", "dice", "iou", "lesion_area_px", "predicted_area_px"]
CI_METRICS = ("dice", "iou", "dice_per_image", "f1_weighted")
FIGURE_1 = "figure1_loss_iou.png"
FIGURE_2 = "figure2_contours.png"


def evaluate(data_dir: Path, masks_dir: Path, model_dir: Path, train_metrics_json: Path, history_csv: Path,
             params: EvaluateParams, out_json: Path, plots_dir: Path, figures_dir: Path,
             val_json: Path | None = None) -> dict:
    """Write test.json (and val.json), the plot CSVs and figures, log them to the training's MLflow run;
    returns the test metrics."""
    run_id = training_run(train_metrics_json)  # before any work: a missing run fails at once
    history = read_history(history_csv)
    if not Path(model_dir).exists():
        raise BusiError(f"{model_dir}: model folder not found; run `dvc repro train`")
    model, _, _ = load_checkpoint(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    val, test = load_split(data_dir, "val"), load_split(data_dir, "test")
    if not len(test["labels"]):
        raise BusiError(f"{Path(data_dir) / 'test.npz'}: the test split holds no images")

    # Post-processing is chosen on the validation split, whose metrics under that choice are what experiments
    # are compared on (val.json); the test split only reports.
    postprocessing = choose_flip_tta(model, val, masks_dir, params)
    val_probabilities, val_class_probabilities = predict_arrays(model, val["images"], flip=postprocessing["flip_tta"])
    postprocessing |= choose_largest_component(val_probabilities, val, masks_dir, params)
    postprocessing |= choose_label_from_mask(val_probabilities, val_class_probabilities, val, masks_dir, params,
                                             postprocessing["largest_component"])
    chosen = (params.threshold, postprocessing["largest_component"], postprocessing["label_from_mask"])
    val_metrics = (split_metrics(val_probabilities, val_class_probabilities, val, masks_dir, *chosen)[0]
                   if len(val["labels"]) else {"images": 0})
    probabilities, class_probabilities = predict_arrays(model, test["images"], flip=postprocessing["flip_tta"])
    metrics, cases, references, predictions = split_metrics(probabilities, class_probabilities, test, masks_dir,
                                                            *chosen)
    metrics |= {"ci95": bootstrap_ci(cases, params.bootstrap, params.seed), "postprocessing": postprocessing}
    figures = {FIGURE_1: training_figure(history),
               FIGURE_2: cases_figure(cases, test, references, predictions, params.figure_cases)}

    for path, content in ((out_json, metrics), (val_json, val_metrics)):
        if path is not None:
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(content, indent=2) + "\n")
    with atomic_file(Path(plots_dir) / "per_image.csv") as tmp:
        cases[PER_IMAGE_COLUMNS].to_csv(tmp, index=False, float_format="%.6f")
    with atomic_file(Path(plots_dir) / "confusion.csv") as tmp:
        pd.DataFrame({"actual": cases["label"], "predicted": cases["predicted_label"]}).to_csv(tmp, index=False)
    for name, figure in figures.items():
        with atomic_file(Path(figures_dir) / name) as tmp:
            figure.savefig(tmp, format="png", dpi=120)  # the temporary name has no .png to infer it from
    log_to_run(run_id, metrics, cases, figures, val_metrics)
    return metrics


def split_metrics(probabilities: np.ndarray, class_probabilities: np.ndarray, arrays: dict, masks_dir: Path,
                  threshold: float, largest_component: bool,
                  label_from_mask: bool = False) -> tuple[dict, pd.DataFrame, list, list]:
    """Segmentation, classification and per-class metrics of one split; also its per-image cases and masks.
    ROC-AUC is the head's, from its probabilities, whichever way the labels are decided."""
    cases, references, predictions = score(probabilities, arrays, masks_dir, threshold, largest_component)
    labels = class_labels(class_probabilities, cases["predicted_area_px"].to_numpy(), label_from_mask)
    cases["predicted_label"] = [CLASSES[i] for i in labels]
    metrics = {"images": len(cases), **segmentation_metrics(cases),
               **classification_metrics(cases, class_probabilities), "per_class": per_class_metrics(cases)}
    return metrics, cases, references, predictions


def training_run(train_metrics_json: Path) -> str:
    """The MLflow run id the training wrote, checked to exist in the tracking store."""
    try:
        run_id = json.loads(Path(train_metrics_json).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BusiError(f"{train_metrics_json}: no training run id ({type(err).__name__}: {err}); "
                        "run `dvc repro train`") from None
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise BusiError(f"{train_metrics_json}: MLflow run {run_id} is not in the tracking store "
                        f"{mlflow.get_tracking_uri()} (set MLFLOW_TRACKING_URI, or re-run training)") from None
    return run_id


def read_history(history_csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(history_csv)
    except (OSError, ValueError) as err:
        raise BusiError(f"{history_csv}: cannot read the training history ({err}); run `dvc repro train`") from None


def read_reference(masks_dir: Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """The merged 0/255 reference mask at its original size, as booleans."""
    path = Path(masks_dir) / f"{image_id}.png"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise BusiError(f"{path}: reference mask missing or unreadable; run `dvc repro merge_masks`")
    if mask.shape != tuple(size):
        raise BusiError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, the image was {size[0]}x{size[1]}")
    return mask > 0


def score(probabilities: np.ndarray, arrays: dict, masks_dir: Path, threshold: float,
          largest_component: bool) -> tuple[pd.DataFrame, list[np.ndarray], list[np.ndarray]]:
    """Per-image pixel counts, Dice and IoU at the original resolution; also returns the reference and predicted
    masks (for the figure). Dice and IoU are NaN where reference and prediction are both empty (no case)."""
    rows, references, predictions = [], [], []
    for probability, image_id, label, (height, width) in zip(probabilities, arrays["ids"], arrays["labels"],
                                                             arrays["sizes"], strict=True):
        reference = read_reference(masks_dir, image_id, (height, width))
        predicted = binarize(to_original_size(probability, int(height), int(width)), threshold, largest_component)
        tp, fp, fn = (np.count_nonzero(m) for m in (predicted & reference, predicted & ~reference,
                                                     ~predicted & reference))
        rows.append({"image_id": str(image_id), "label": CLASSES[label], "tp": tp, "fp": fp, "fn": fn,
                     "tn": reference.size - tp - fp - fn})
        references.append(reference)
        predictions.append(predicted)
    cases = pd.DataFrame(rows, columns=["image_id", "label", "tp", "fp", "fn", "tn"])
    tp, fp, fn = (cases[c].to_numpy(float) for c in ("tp", "fp", "fn"))
    with np.errstate(invalid="ignore"):  # 0/0: both empty
        cases["dice"] = 2 * tp / (2 * tp + fp + fn)
        cases["iou"] = tp / (tp + fp + fn)
    cases["lesion_area_px"] = cases["tp"] + cases["fn"]
    cases["predicted_area_px"] = cases["tp"] + cases["fp"]
    return cases, references, predictions


def segmentation_metrics(cases: pd.DataFrame) -> dict[str, float]:
    """Pooled IoU, Dice and pixel accuracy over all pixels (as the study); Dice and IoU per image averaged over
    images with a reference lesion; the share of normal images with any predicted lesion. A metric with no case
    to measure (no lesion, no normal image) is left out rather than written as NaN."""
    tp, fp, fn, tn = (int(cases[c].sum()) for c in ("tp", "fp", "fn", "tn"))
    metrics = {"pixel_accuracy": (tp + tn) / (tp + fp + fn + tn)}
    lesion = cases["lesion_area_px"] > 0
    if lesion.any():
        metrics |= {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                    "dice_per_image": cases.loc[lesion, "dice"].mean(),
                    "iou_per_image": cases.loc[lesion, "iou"].mean()}
    normal = cases["label"] == "normal"
    if normal.any():
        metrics["normal_fp_rate"] = (cases.loc[normal, "predicted_area_px"] > 0).mean()
    return {key: float(value) for key, value in metrics.items()}


def classification_metrics(cases: pd.DataFrame, class_probabilities: np.ndarray) -> dict:
    actual, predicted = cases["label"], cases["predicted_label"]
    metrics = {"f1_weighted": f1_score(actual, predicted, average="weighted", zero_division=0),
               "f1_macro": f1_score(actual, predicted, average="macro", zero_division=0),
               "accuracy": accuracy_score(actual, predicted)}
    if actual.nunique() == len(CLASSES):  # one-vs-rest AUC is undefined for a class the test split lacks
        metrics["roc_auc_ovr"] = roc_auc_score(actual, class_probabilities, multi_class="ovr", labels=list(CLASSES))
    matrix = confusion_matrix(actual, predicted, labels=list(CLASSES))
    return {**{key: float(value) for key, value in metrics.items()},
            "confusion": {a: {p: int(n) for p, n in zip(CLASSES, row, strict=True)}
                          for a, row in zip(CLASSES, matrix, strict=True)}}


def per_class_metrics(cases: pd.DataFrame) -> dict:
    """Segmentation metrics within each class, and that class's precision, recall and F1 as a prediction."""
    precision, recall, f1, _ = precision_recall_fscore_support(cases["label"], cases["predicted_label"],
                                                               labels=list(CLASSES), zero_division=0)
    per_class = {}
    for i, name in enumerate(CLASSES):
        subset = cases[cases["label"] == name]
        per_class[name] = {"images": len(subset), **(segmentation_metrics(subset) if len(subset) else {}),
                           "f1": float(f1[i]), "precision": float(precision[i]), "recall": float(recall[i])}
    return per_class


def bootstrap_ci(cases: pd.DataFrame, resamples: int, seed: int) -> dict:
    """95% percentile intervals over `resamples` draws of test images with replacement (pooled metrics are
    recomputed over each draw's pixels). A metric undefined in a draw (no lesion image drawn) skips that draw."""
    if not resamples:
        return {}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        sample = cases.iloc[rng.integers(0, len(cases), len(cases))]
        values = segmentation_metrics(sample) | {
            "f1_weighted": f1_score(sample["label"], sample["predicted_label"], average="weighted", zero_division=0)}
        draws.append([values.get(name, np.nan) for name in CI_METRICS])
    with warnings.catch_warnings():  # an all-NaN column (no lesion at all) gives NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.array(draws), [2.5, 97.5], axis=0)
    return {name: {"low": float(lo), "high": float(hi)}
            for name, lo, hi in zip(CI_METRICS, low, high, strict=True) if np.isfinite(lo)}


def choose_flip_tta(model, val: dict, masks_dir: Path, params: EvaluateParams) -> dict:
    """Average with the mirrored image? Forced by on/off; for auto, only if it raises the validation split's
    mean of per-image Dice and weighted F1 (it changes both the masks and the classes)."""
    decision = {"flip_tta": params.flip_tta == "on"}
    if params.flip_tta != "auto" or not len(val["labels"]):
        return decision
    score_of = {}
    for flip in (True, False):
        probabilities, class_probabilities = predict_arrays(model, val["images"], flip=flip)
        cases, _, _ = score(probabilities, val, masks_dir, params.threshold, largest_component=False)
        cases["predicted_label"] = [CLASSES[i] for i in class_probabilities.argmax(1)]
        dice = segmentation_metrics(cases)["dice_per_image"]
        f1 = f1_score(cases["label"], cases["predicted_label"], average="weighted", zero_division=0)
        score_of[flip] = float(np.nanmean([dice, f1]))
    return {"flip_tta": score_of[True] > score_of[False],
            "val_score_with_flip": score_of[True], "val_score_without_flip": score_of[False]}


def choose_largest_component(val_probabilities: np.ndarray, val: dict, masks_dir: Path,
                             params: EvaluateParams) -> dict:
    """Keep only the largest connected component? Forced by on/off; for auto, only if it raises the validation
    split's per-image Dice. The validation figures are recorded either way (where the split has lesions)."""
    decision = {"largest_component": params.largest_component == "on"}
    dice = {}
    for keep in (True, False):
        cases, _, _ = score(val_probabilities, val, masks_dir, params.threshold, keep)
        if len(cases) and (cases["lesion_area_px"] > 0).any():
            dice[keep] = segmentation_metrics(cases)["dice_per_image"]
    if dice:
        decision |= {"val_dice_with": dice[True], "val_dice_without": dice[False]}
        if params.largest_component == "auto":
            decision["largest_component"] = bool(dice[True] > dice[False])
    return decision


def choose_label_from_mask(val_probabilities: np.ndarray, val_class_probabilities: np.ndarray, val: dict,
                           masks_dir: Path, params: EvaluateParams, largest_component: bool) -> dict:
    """Let the class follow the predicted mask (no lesion -> normal)? Forced by on/off; for auto, only if it
    raises the validation split's weighted F1."""
    decision = {"label_from_mask": params.label_from_mask == "on"}
    if params.label_from_mask != "auto" or not len(val["labels"]):
        return decision
    f1 = {from_mask: split_metrics(val_probabilities, val_class_probabilities, val, masks_dir, params.threshold,
                                   largest_component, from_mask)[0]["f1_weighted"] for from_mask in (True, False)}
    return {"label_from_mask": f1[True] > f1[False], "val_f1_with_mask_label": f1[True],
            "val_f1_without_mask_label": f1[False]}


def training_figure(history: pd.DataFrame) -> Figure:
    """Figure 1 of the study: training and validation loss and IoU per epoch."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    for ax, (metric, title) in zip(fig.subplots(1, 2), {"loss": "Loss", "iou": "IoU"}.items(), strict=True):
        for split in ("train", "val"):
            if f"{split}_{metric}" in history:
                ax.plot(history["epoch"], history[f"{split}_{metric}"], marker=".", label=split)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.has_data():
            ax.legend()
    return fig


def cases_figure(cases: pd.DataFrame, arrays: dict, references: list, predictions: list, count: int) -> Figure:
    """Figure 2: per class, the `count` best and worst test cases (by Dice; normal images by predicted area),
    reference contour green, prediction red, at the original resolution."""
    fig = Figure(figsize=(2.6 * 2 * count, 2.8 * len(CLASSES)), layout="constrained")
    axes = fig.subplots(len(CLASSES), 2 * count, squeeze=False)
    fig.suptitle(f"Test cases, best {count} then worst {count} per class: reference green, prediction red")
    for row, name in zip(axes, CLASSES, strict=True):
        subset = cases[cases["label"] == name]
        ranked = (subset.sort_values("predicted_area_px") if name == "normal"
                  else subset.sort_values("dice", ascending=False)).index.tolist()
        picks = ranked[:count] + ranked[max(count, len(ranked) - count):]  # best, then worst, never twice
        for ax in row:
            ax.set(xticks=[], yticks=[])
        for ax in row[len(picks) :]:  # a class with fewer than 2 * count test images
            ax.axis("off")
        row[0].set_ylabel(name)
        for ax, i in zip(row, picks, strict=False):
            reference, predicted = references[i], predictions[i]
            image = cv2.resize(arrays["images"][i], reference.shape[::-1], interpolation=cv2.INTER_LINEAR)
            ax.imshow(image, cmap="gray")
            for mask, colour in ((reference, "lime"), (predicted, "red")):
                if mask.any():  # contour() warns on a constant array
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1)
            case = cases.loc[i]
            detail = (f"{case.predicted_area_px} px predicted" if name == "normal" else f"Dice {case.dice:.2f}")
            ax.set_title(f"{case.image_id}\n{detail}", fontsize=8)
    return fig


def log_to_run(run_id: str, metrics: dict, cases: pd.DataFrame, figures: dict[str, Figure],
               val_metrics: dict | None = None) -> None:
    """Add the results to the training's MLflow run: every numeric leaf as `test.<dotted.key>` (and the
    validation split's as `val.<dotted.key>`)."""
    flat = tracking.flatten(metrics)
    val_flat = {f"val.{k}": v for k, v in tracking.flatten(val_metrics or {}).items() if not isinstance(v, bool)}
    table = pd.DataFrame([{"class": "all", **{k: v for k, v in metrics.items() if not isinstance(v, dict)}},
                          *({"class": name, **values} for name, values in metrics["per_class"].items())])
    # start_run refuses a run outside the active experiment (one set earlier in this process, or by the environment)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    mlflow.start_run(run_id=run_id)
    try:  # not the context manager: a failure here must not mark the training run FAILED
        mlflow.log_metrics({f"test.{k}": v for k, v in flat.items() if not isinstance(v, bool)} | val_flat)
        mlflow.set_tags({f"test.{k}": str(v) for k, v in flat.items() if isinstance(v, bool)})
        log_table(run_id, table, "test_metrics.json")
        log_table(run_id, cases[PER_IMAGE_COLUMNS], "test_per_image.json")
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
    finally:
        mlflow.end_run()


def log_table(run_id: str, table: pd.DataFrame, name: str) -> None:
    """mlflow.log_table appends to a table the run already has: a re-evaluation replaces it instead, written in
    the same layout (pandas' split orient) that log_table uses and the MLflow UI reads."""
    if name in {artifact.path for artifact in mlflow.MlflowClient().list_artifacts(run_id)}:
        mlflow.log_text(table.to_json(orient="split", index=False), name)
    else:
        mlflow.log_table(table, name)
