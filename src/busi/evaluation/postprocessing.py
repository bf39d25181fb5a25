"""Post-processing decided on the validation split (never on test), as nnU-Net decides its post-processing on
cross-validation and saves it for inference: the decisions (`decide`), temperature calibration's fit, and the
scoring of a split under a post-processing. The transform itself (`PostProcessing`: probabilities -> a mask and
a label) is inference's, in busi.model.postprocessing.

A new post-processing step is one entry of busi.model.postprocessing.STEPS; `decide` judges it by the entry's
criterion, and every caller picks it up.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from busi import BusiError
from busi.config import EvaluateParams
from busi.evaluation import metrics
from busi.evaluation.figures import cases_figure
from busi.evaluation.metrics import CASE_COLUMNS, bootstrap_ci
from busi.files import atomic_file
from busi.model.postprocessing import STEPS, PostProcessing, shown, softmax, step_settings

TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8), 241))  # 1.5% apart


def fit_temperature(labels: np.ndarray, class_probabilities: np.ndarray) -> float:
    """The temperature (on a log grid from 0.25 to 8) that minimises the negative log-likelihood of `labels`."""
    log_p = np.log(np.clip(class_probabilities, 1e-12, 1))
    nll = [-np.log(softmax(log_p / t)[np.arange(len(labels)), labels] + 1e-12).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def score(postprocessing: PostProcessing, probabilities: np.ndarray, class_probabilities: np.ndarray, arrays: dict,
          references: list[np.ndarray], crop: Callable | None = None) -> tuple[dict, pd.DataFrame, list[np.ndarray]]:
    """A split's metrics, per-image cases and predicted masks under `postprocessing` (its flip TTA is already in
    the probabilities; `crop`, where given, classifies the crops around the masks: busi.model.predictor)."""
    masks, labels, class_probabilities = postprocessing.apply(probabilities, class_probabilities, arrays["sizes"],
                                                              crop)
    cases = metrics.case_table(arrays["ids"], arrays["labels"], labels, masks, references, class_probabilities,
                               arrays.get("groups"))
    return metrics.summary(cases, class_probabilities), cases, masks


@dataclass
class Scored:
    """A split scored for a report: its metrics with 95% intervals, the per-image cases, the cases figure."""
    metrics: dict
    cases: pd.DataFrame
    figure: Figure

    def write_cases(self, path: Path, columns: list[str] = CASE_COLUMNS) -> None:
        with atomic_file(path) as tmp:
            self.cases[columns].to_csv(tmp, index=False, float_format="%.6f")


def score_split(postprocessing: PostProcessing, probabilities: tuple[np.ndarray, np.ndarray], arrays: dict,
                references: list[np.ndarray], params: EvaluateParams, title: str = "Test cases",
                crop: Callable | None = None) -> Scored:
    """The one way evaluate, cross-validate and evaluate-external score a split they report: `score`, then the
    bootstrap intervals (drawing the split's groups whole: arrays["groups"], the scans or patients) and the best
    and worst cases."""
    metrics, cases, masks = score(postprocessing, *probabilities, arrays, references, crop)
    metrics["ci95"] = bootstrap_ci(cases, params.bootstrap, params.seed)
    return Scored(metrics, cases, cases_figure(cases, arrays, references, masks, params.figure_cases, title=title))


def decide(probabilities_of: Callable[[bool], tuple[np.ndarray, np.ndarray]], val: dict, references: list,
           params: EvaluateParams, crop: Callable | None = None) -> tuple[PostProcessing, dict]:
    """The post-processing for `params` on the validation split: steps set on/off (or to a value) in params are
    taken as given; each `auto` step, in the order of STEPS, is tried at each of its values on top of the steps
    decided before it, and keeps the value with the highest mean of its criterion (a tie keeps the earlier value,
    "off" first).
    `probabilities_of(flip)` predicts the validation images; `crop(masks)` classifies the crops around their
    masks (without a crop network: None, and the steps that need one stay off). With `evaluate.calibration:
    temperature`, the temperature is fitted on the class head's validation probabilities (by likelihood) and
    every candidate is scored with it, so the crop network is weighed against the calibrated head, as inference
    applies it. Returns the post-processing and the validation figures behind each decision
    ({step: {value: score}})."""
    try:
        settings = step_settings(params.postprocessing)
    except ValueError as err:
        raise BusiError(str(err)) from None
    chosen = PostProcessing(threshold=params.threshold,
                            **{name: setting for name, setting in settings.items() if setting != "auto"})
    record = {}

    @functools.cache  # each step tries the post-processing decided so far again: score it once
    def val_metrics(candidate: PostProcessing) -> dict:
        return score(candidate, *probabilities_of(candidate.flip_tta), val, references, crop)[0]

    @functools.cache
    def temperature(flip: bool) -> float:  # the head's probabilities depend on flip TTA only
        return fit_temperature(val["labels"], probabilities_of(flip)[1])

    def calibrated(candidate: PostProcessing) -> PostProcessing:
        if params.calibration != "temperature" or not len(val["labels"]):
            return candidate
        return replace(candidate, temperature=temperature(candidate.flip_tta))

    if crop is None:  # steps at `classes` need a crop network
        chosen = replace(chosen, **{step.name: step.values[0] for step in STEPS if step.point == "classes"})
    for step in (step for step in STEPS if settings[step.name] == "auto" and len(val["labels"])):
        if step.point == "classes" and crop is None:
            continue
        if any(getattr(chosen, other) for other in step.excludes):
            continue  # e.g. labels from the mask: the class already gates the mask
        scores = {}
        for value in step.values:
            figures = val_metrics(calibrated(replace(chosen, **{step.name: value})))
            defined = [figures[key] for key in step.criterion if not np.isnan(figures.get(key, np.nan))]
            scores[value] = float(np.mean(defined)) if defined else np.nan
        if np.isnan(list(scores.values())).any():
            continue  # the criterion is undefined here (no lesion in the split)
        best = max(scores, key=lambda value: (scores[value], -step.values.index(value)))
        chosen = replace(chosen, **{step.name: best})
        record[step.name] = {shown(value): round(figure, 6) for value, figure in scores.items()}

    chosen = calibrated(chosen)
    if chosen.temperature != 1.0:
        record["temperature"] = {"val_ece_before": val_metrics(replace(chosen, temperature=1.0))["ece"]}
    return chosen, record
