"""Post-processing decided on the validation split (never on test), as nnU-Net decides its post-processing on
cross-validation and saves it for inference: the decisions (`decide`), temperature calibration's fit, and the
scoring of a split under a post-processing. The transform itself (`PostProcessing`: probabilities -> a mask and
a label) is inference's, in busi.model.postprocessing.

A new post-processing step is a field of `PostProcessing` (busi.model.postprocessing), its use in `mask`/
`labels`, and its decision in `decide` here; every caller picks it up.
"""

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from busi.config import EvaluateParams
from busi.evaluation import metrics
from busi.model.postprocessing import PostProcessing, softmax

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

