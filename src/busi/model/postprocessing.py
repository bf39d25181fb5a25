"""Post-processing as inference applies it: one transform from the networks' probabilities to a mask and a label,
the same for evaluate, ablate, predict and serving (busi.model.predictor). Its settings are decided on
validation by busi.evaluation.postprocessing and saved in the predictor folder.

A post-processing step is one entry of STEPS below: its function (where in the transform it acts) and, from the
entry, the `PostProcessing` field, the params (`evaluate.postprocessing.<name>`), the `busi predict --<name>`
flag, the decision on validation (its `criterion`) and the row of `busi ablate`.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, make_dataclass

import cv2
import numpy as np

from busi import CLASSES

BENIGN, MALIGNANT, NORMAL = (CLASSES.index(name) for name in ("benign", "malignant", "normal"))


def regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's connected lesion regions (8-connected): a label image (0: background) and each region's area."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, stats[1:, cv2.CC_STAT_AREA]


def thresholded(probability: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """A lesion probability map at the training size -> a boolean mask at the image's own size: bilinear resize
    first, threshold after."""
    resized = cv2.resize(probability, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    return resized >= threshold


# The steps' functions. `value` is the step's value, never its "off" (then the step is not called). Where each
# acts, by its Step's `point`:
#   mask    f(mask, value) -> mask: each image's boolean mask at its own size, after the threshold
#   classes f(class_probabilities, crop_malignant, value) -> class_probabilities (the head's, calibrated), once
#           the masks are drawn, with the crop network's malignant probability around each mask's lesion (NaN:
#           none drawn); steps here need a crop network (busi.model.crop) and are skipped without one
#   labels  f(labels, class_probabilities, lesion_areas, value) -> labels: every image's class index
#   gate    f(mask, probability, label, value) -> mask: each image's mask once its label is known
#   input   no function here: the predictor applies it to the networks' input (busi.model.predictor)

def drop_small_regions(mask: np.ndarray, fraction: float) -> np.ndarray:
    labels, areas = regions(mask)
    return np.isin(labels, 1 + np.flatnonzero(areas >= fraction * mask.size))


def keep_largest_region(mask: np.ndarray, _on: bool = True) -> np.ndarray:
    if not mask.any():
        return mask
    labels, areas = regions(mask)
    return labels == 1 + np.argmax(areas)


def average_with_crop(class_probabilities: np.ndarray, crop_malignant: np.ndarray, weight: float) -> np.ndarray:
    """The class head's split of the lesion probability (benign + malignant) between benign and malignant,
    averaged with the crop network's malignant probability, `weight` on the crop's, where a crop was classified;
    the normal probability unchanged."""
    lesion = class_probabilities[:, BENIGN] + class_probabilities[:, MALIGNANT]
    head = class_probabilities[:, MALIGNANT] / np.maximum(lesion, 1e-12)
    share = np.where(np.isnan(crop_malignant), head, (1 - weight) * head + weight * np.nan_to_num(crop_malignant))
    averaged = np.array(class_probabilities, dtype=float)
    averaged[:, MALIGNANT], averaged[:, BENIGN] = lesion * share, lesion * (1 - share)
    return averaged


def label_from_mask(labels: np.ndarray, class_probabilities: np.ndarray, lesion_areas: np.ndarray,
                    _on: bool) -> np.ndarray:
    """No lesion drawn -> normal; else the more probable of benign and malignant."""
    lesion = np.where(np.arange(len(CLASSES)) == NORMAL, -np.inf, class_probabilities).argmax(1)
    return np.where(np.asarray(lesion_areas) > 0, lesion, NORMAL)


def mask_from_label(mask: np.ndarray, probability: np.ndarray, label: int, _on: bool) -> np.ndarray:
    """The mask that agrees with the label: empty for normal; for a lesion label where nothing reached the
    threshold, the largest region at half the map's highest probability (the network's best guess of where the
    lesion the class head sees is)."""
    if label == NORMAL:
        return np.zeros_like(mask)
    if mask.any() or not probability.max() > 0:
        return mask
    return keep_largest_region(thresholded(probability, *mask.shape, probability.max() / 2))


@dataclass(frozen=True)
class Step:
    name: str  # the PostProcessing field, the params key under evaluate.postprocessing, the predict flag
    help: str
    # `auto` tries each value on the validation split (the first is "off") and keeps the one with the highest
    # mean of these validation metrics; a tie keeps the earlier value.
    criterion: tuple[str, ...]
    point: str  # where it acts: input | mask | labels | gate (see the functions above)
    function: Callable | None = None
    values: tuple = (False, True)
    # steps this one replaces: `auto` does not try it while one of them is on, and `busi ablate` switches them off
    excludes: tuple[str, ...] = ()

    @property
    def on(self):
        """What `on` in params means, and what `busi ablate` switches on: the last of `values`."""
        return self.values[-1]


STEPS = (  # in the order they are decided, and applied at each point
    Step("flip_tta", "average with the mirrored image's prediction (test-time augmentation)",
         ("dice_per_image", "f1_weighted"), "input"),
    Step("min_lesion_area", "drop lesion regions smaller than this fraction of the image",
         ("dice_per_image_all",), "mask", drop_small_regions, values=(0.0, 0.001, 0.002, 0.005, 0.01)),
    Step("largest_component", "keep only the largest lesion region", ("dice_per_image",), "mask",
         keep_largest_region),
    # The crop network's weight against the class head's (the head's probabilities calibrated by then).
    Step("crop_weight", "average the crop network's malignant probability with the class head's, this weight on it",
         ("f1_weighted", "auc_malignant_vs_benign"), "classes", average_with_crop, values=(0.0, 0.25, 0.5, 0.75)),
    Step("label_from_mask", "no predicted lesion -> normal, else the more probable of benign and malignant",
         ("f1_weighted",), "labels", label_from_mask),
    # Judged on every image (an empty mask on an image without lesion scores 1): it trades lesions lost on
    # misclassified lesion images for lesions no longer drawn on normal ones.
    Step("mask_from_label", "the mask follows the class: normal -> empty, a lesion class -> its likeliest region",
         ("dice_per_image_all",), "gate", mask_from_label, excludes=("label_from_mask",)),
)


def step_settings(settings: dict) -> dict:
    """Params' evaluate.postprocessing as {step: "auto" or its value}, for every step of STEPS (one left out is
    off; YAML's on/off may arrive as true/false). Raises ValueError naming the key of an unknown step or of a
    setting that is not auto, on, off or (for a numeric step) a value in [0, 1)."""
    steps = {step.name: step for step in STEPS}
    for name, setting in settings.items():
        if name not in steps:
            raise ValueError(f"evaluate.postprocessing.{name}: unknown step (steps: {', '.join(steps)})")
        numeric = type(steps[name].on) is not bool
        if not (setting in ("auto", "on", "off") or type(setting) is bool
                or numeric and type(setting) in (int, float) and 0 <= setting < 1):
            raise ValueError(f"evaluate.postprocessing.{name}: {setting!r} is not auto, on, off"
                             f"{' or a number from 0 to 1' if numeric else ''}")
    named = {True: "on", False: "off"}
    as_given = {name: named.get(setting, setting) if type(setting) is bool else setting
                for name, setting in settings.items()}
    return {step.name: {"on": step.on, "off": step.values[0]}.get(as_given.get(step.name, "off"),
                                                                  as_given.get(step.name, "off"))
            for step in STEPS}


class Transform:
    """The methods of PostProcessing, whose fields are the threshold, one per step of STEPS (its default: the
    step's "off") and the temperature."""

    def steps(self, point: str) -> list[tuple[Callable, object]]:
        """(function, value) of the steps at `point` that are not off, in the order of STEPS."""
        return [(step.function, getattr(self, step.name)) for step in STEPS
                if step.point == point and getattr(self, step.name) != step.values[0]]

    def calibrate(self, class_probabilities: np.ndarray) -> np.ndarray:
        """Temperature scaling of probabilities (of an ensemble's or flip-averaged, hence on log p rather than on
        one network's logits). It keeps each image's ranking of classes, so labels and ROC-AUC are unchanged."""
        if self.temperature == 1.0:
            return class_probabilities
        return softmax(np.log(np.clip(class_probabilities, 1e-12, 1)) / self.temperature)

    def mask(self, probability: np.ndarray, height: int, width: int) -> np.ndarray:
        """A lesion probability map at the training size -> a boolean mask at the image's own size."""
        mask = thresholded(probability, height, width, self.threshold)
        for function, value in self.steps("mask"):
            mask = function(mask, value)
        return mask

    def labels(self, class_probabilities: np.ndarray, lesion_areas: np.ndarray) -> np.ndarray:
        """Class indices: the head's most probable class, unless a step at `labels` says otherwise."""
        labels = class_probabilities.argmax(1)
        for function, value in self.steps("labels"):
            labels = function(labels, class_probabilities, lesion_areas, value)
        return labels

    def apply(self, probabilities: np.ndarray, class_probabilities: np.ndarray, sizes: np.ndarray,
              crop: Callable[[list[np.ndarray]], np.ndarray] | None = None,
              ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Masks at each image's (height, width) in `sizes`, class indices and class probabilities (calibrated, and
        with the crop network's say).
        `crop(masks)` is the crop network's malignant probability around each mask's lesion (the predictor's,
        which holds the original images); without it, the steps at `classes` are skipped."""
        masks = [self.mask(p, h, w) for p, (h, w) in zip(probabilities, sizes, strict=True)]
        class_probabilities = self.calibrate(class_probabilities)  # the head's, before the crop network's say
        if crop is not None and self.steps("classes"):
            crop_malignant = crop(masks)
            for function, value in self.steps("classes"):
                class_probabilities = function(class_probabilities, crop_malignant, value)
        labels = self.labels(class_probabilities, np.array([np.count_nonzero(m) for m in masks]))
        for function, value in self.steps("gate"):
            masks = [function(m, p, label, value) for m, p, label in zip(masks, probabilities, labels, strict=True)]
        return masks, labels, class_probabilities

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Transform":
        """From a predictor manifest (which anyone may have edited): every field named, typed and in range."""
        if not isinstance(values, dict):
            raise ValueError(f"postprocessing must be a mapping, got {type(values).__name__}")
        in_range = {"threshold": lambda v: 0 < v < 1, "temperature": lambda v: 0 < v < 100}  # numeric steps: [0, 1)
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ValueError(f"postprocessing: unknown step {unknown[0]!r}")
        for name, value in values.items():
            ok = in_range.get(name, lambda v: 0 <= v < 1)
            if kinds[name] in (float, "float") and not (type(value) in (int, float) and ok(value)):
                raise ValueError(f"postprocessing.{name}: {value!r} is not a number in range")
            if kinds[name] in (bool, "bool") and type(value) is not bool:
                raise ValueError(f"postprocessing.{name}: {value!r} is not true or false")
        return cls(**values)

    def describe(self) -> str:
        values = {step.name.replace("_", " "): getattr(self, step.name) for step in STEPS}
        steps = ", ".join(f"{name} {shown(value) if value else 'off'}" for name, value in values.items())
        return f"threshold {self.threshold:g}, {steps}, temperature {self.temperature:.2f}"


# threshold: on the lesion probability, at the image's own size; temperature: class probabilities
# p -> softmax(log p / T), fitted on validation (calibration). Frozen, so a decision can cache its scores.
PostProcessing = make_dataclass(
    "PostProcessing",
    [("threshold", float, 0.5),
     *((step.name, type(step.values[0]), step.values[0]) for step in STEPS),
     ("temperature", float, 1.0)],
    bases=(Transform,), frozen=True, namespace={"__module__": __name__})


def shown(value) -> str:
    """A step's value as it is written (JSON keys, ablation rows): on/off, or the number."""
    return {True: "on", False: "off"}[value] if type(value) is bool else f"{value:g}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)
