"""Post-processing: one transform from the networks' probabilities to a mask and a label, applied the same way by
evaluate, ablate, predict and serving (busi.model.predictor), and the decisions that set it on the validation
split (never on test), as nnU-Net decides its post-processing on cross-validation and saves it for inference.

A new post-processing step is a field of `PostProcessing`, its use in `mask`/`labels`, and its decision in
`decide`; every caller picks it up.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import cv2
import numpy as np
import pandas as pd

from busi import CLASSES
from busi.config import EvaluateParams
from busi.evaluation import metrics


@dataclass(frozen=True)
class PostProcessing:
    threshold: float = 0.5  # on the lesion probability, at the image's own size
    flip_tta: bool = False  # average the probabilities with those of the mirrored image (applied by the predictor)
    largest_component: bool = False  # keep only the largest connected lesion region
    label_from_mask: bool = False  # no predicted lesion -> normal, else the more probable of benign/malignant
    # The class gates the mask: an image labelled normal gets an empty mask, and an image labelled benign or
    # malignant whose mask is empty gets its most probable region (see `apply`).
    mask_from_label: bool = False
    temperature: float = 1.0  # class probabilities p -> softmax(log p / T), fitted on validation: calibration

    def calibrate(self, class_probabilities: np.ndarray) -> np.ndarray:
        """Temperature scaling of probabilities (of an ensemble's or flip-averaged, hence on log p rather than on
        one network's logits). It keeps each image's ranking of classes, so labels and ROC-AUC are unchanged."""
        if self.temperature == 1.0:
            return class_probabilities
        return softmax(np.log(np.clip(class_probabilities, 1e-12, 1)) / self.temperature)

    def mask(self, probability: np.ndarray, height: int, width: int, threshold: float | None = None) -> np.ndarray:
        """A lesion probability map at the training size -> a boolean mask at the image's own size: bilinear
        resize first, threshold after (this post-processing's, unless `threshold` says)."""
        resized = cv2.resize(probability, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
        mask = resized >= (self.threshold if threshold is None else threshold)
        if self.largest_component and mask.any():
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            if count > 2:  # background + more than one component
                mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        return mask

    def labels(self, class_probabilities: np.ndarray, predicted_area: np.ndarray) -> np.ndarray:
        """Class indices: the head's most probable class, or, `label_from_mask`, the class the mask implies."""
        if not self.label_from_mask:
            return class_probabilities.argmax(1)
        normal = CLASSES.index("normal")
        lesion = np.where(np.arange(len(CLASSES)) == normal, -np.inf, class_probabilities).argmax(1)
        return np.where(np.asarray(predicted_area) > 0, lesion, normal)

    def apply(self, probabilities: np.ndarray, class_probabilities: np.ndarray,
              sizes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Masks at each image's (height, width) in `sizes`, class indices and calibrated class probabilities."""
        masks = [self.mask(p, h, w) for p, (h, w) in zip(probabilities, sizes, strict=True)]
        labels = self.labels(class_probabilities, np.array([np.count_nonzero(m) for m in masks]))
        if self.mask_from_label:
            masks = [self.gated(m, p, label) for m, p, label in zip(masks, probabilities, labels, strict=True)]
        return masks, labels, self.calibrate(class_probabilities)

    def gated(self, mask: np.ndarray, probability: np.ndarray, label: int) -> np.ndarray:
        """The mask that agrees with the label: empty for normal; for a lesion label where nothing reached the
        threshold, the largest region at half the map's highest probability (the network's best guess of
        where the lesion the class head sees is)."""
        if label == CLASSES.index("normal"):
            return np.zeros_like(mask)
        if mask.any() or not probability.max() > 0:
            return mask
        return replace(self, largest_component=True).mask(probability, *mask.shape, threshold=probability.max() / 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PostProcessing":
        """From a predictor manifest (which anyone may have edited): every field named, typed and in range."""
        if not isinstance(values, dict):
            raise ValueError(f"postprocessing must be a mapping, got {type(values).__name__}")
        numeric = {f.name: f.type in (float, "float") for f in fields(cls)}
        unknown = sorted(set(values) - set(numeric))
        if unknown:
            raise ValueError(f"postprocessing: unknown step {unknown[0]!r}")
        for name, value in values.items():
            if numeric[name] and not (type(value) in (int, float) and 0 < value < (1 if name == "threshold" else 100)):
                raise ValueError(f"postprocessing.{name}: {value!r} is not a number in range")
            if not numeric[name] and type(value) is not bool:
                raise ValueError(f"postprocessing.{name}: {value!r} is not true or false")
        return cls(**values)

    def describe(self) -> str:
        on = {True: "on", False: "off"}
        return (f"threshold {self.threshold:g}, flip TTA {on[self.flip_tta]}, largest component "
                f"{on[self.largest_component]}, label from mask {on[self.label_from_mask]}, mask from label "
                f"{on[self.mask_from_label]}, temperature {self.temperature:.2f}")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8), 241))  # 1.5% apart


def fit_temperature(labels: np.ndarray, class_probabilities: np.ndarray) -> float:
    """The temperature (on a log grid from 0.25 to 8) that minimises the negative log-likelihood of `labels`."""
    log_p = np.log(np.clip(class_probabilities, 1e-12, 1))
    nll = [-np.log(softmax(log_p / t)[np.arange(len(labels)), labels] + 1e-12).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def score(postprocessing: PostProcessing, probabilities: np.ndarray, class_probabilities: np.ndarray, arrays: dict,
          references: list[np.ndarray]) -> tuple[dict, pd.DataFrame, list[np.ndarray]]:
    """A split's metrics, per-image cases and predicted masks under `postprocessing` (its flip TTA is already in
    the probabilities). ROC-AUC is the head's, whichever way the labels are decided."""
    masks, labels, class_probabilities = postprocessing.apply(probabilities, class_probabilities, arrays["sizes"])
    cases = metrics.case_table(arrays["ids"], arrays["labels"], labels, masks, references, class_probabilities)
    return metrics.summary(cases, class_probabilities), cases, masks


def decide(probabilities_of: Callable[[bool], tuple[np.ndarray, np.ndarray]], val: dict, references: list,
           params: EvaluateParams) -> tuple[PostProcessing, dict]:
    """Each `auto` step of params on the validation split, in order: flip TTA (if it raises the mean of per-image
    Dice and weighted F1), largest component (if it raises per-image Dice), labels from the mask (if it raises
    weighted F1); `on`/`off` are taken as given. `probabilities_of(flip)` predicts the validation images.
    Returns the post-processing and the validation figures behind each decision."""
    chosen = PostProcessing(threshold=params.threshold, flip_tta=params.flip_tta == "on",
                            largest_component=params.largest_component == "on",
                            label_from_mask=params.label_from_mask == "on")
    record = {}
    if not len(val["labels"]):
        return chosen, record

    def val_metrics(candidate: PostProcessing) -> dict:
        return score(candidate, *probabilities_of(candidate.flip_tta), val, references)[0]

    if params.flip_tta == "auto":
        score_of = {}
        for flip in (True, False):
            candidate = val_metrics(PostProcessing(threshold=params.threshold, flip_tta=flip))
            score_of[flip] = float(np.nanmean([candidate.get("dice_per_image", np.nan), candidate["f1_weighted"]]))
        chosen = replace(chosen, flip_tta=score_of[True] > score_of[False])
        record |= {"val_score_with_flip": score_of[True], "val_score_without_flip": score_of[False]}

    dice = {keep: val_metrics(replace(chosen, largest_component=keep, label_from_mask=False)).get("dice_per_image")
            for keep in (True, False)}
    if None not in dice.values():  # the split has lesions
        record |= {"val_dice_with": dice[True], "val_dice_without": dice[False]}
        if params.largest_component == "auto":
            chosen = replace(chosen, largest_component=bool(dice[True] > dice[False]))

    if params.label_from_mask == "auto":
        f1 = {from_mask: val_metrics(replace(chosen, label_from_mask=from_mask))["f1_weighted"]
              for from_mask in (True, False)}
        chosen = replace(chosen, label_from_mask=f1[True] > f1[False])
        record |= {"val_f1_with_mask_label": f1[True], "val_f1_without_mask_label": f1[False]}

    # The class gating the mask is judged on every image (an empty mask on an image without lesion scores 1),
    # since it trades lesions lost on misclassified lesion images for lesions no longer drawn on normal ones.
    chosen = replace(chosen, mask_from_label=params.mask_from_label == "on")
    if params.mask_from_label == "auto" and not chosen.label_from_mask:  # label from mask: already consistent
        dice_all = {gate: val_metrics(replace(chosen, mask_from_label=gate)).get("dice_per_image_all")
                    for gate in (True, False)}
        chosen = replace(chosen, mask_from_label=bool(dice_all[True] > dice_all[False]))
        record |= {"val_dice_all_with_gate": dice_all[True], "val_dice_all_without_gate": dice_all[False]}

    if params.calibration == "temperature":
        chosen = replace(chosen, temperature=fit_temperature(val["labels"], probabilities_of(chosen.flip_tta)[1]))
        record |= {"val_ece_before": val_metrics(replace(chosen, temperature=1.0))["ece"]}
    return chosen, record

