"""Post-processing as inference applies it: one transform from the networks' probabilities to a mask and a label,
the same for evaluate, ablate, predict and serving (busi.model.predictor). Its settings are decided on
validation by busi.evaluation.postprocessing and saved in the predictor folder."""

from dataclasses import asdict, dataclass, fields, replace

import cv2
import numpy as np

from busi import CLASSES


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
