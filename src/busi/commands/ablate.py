"""`python -m busi ablate`: what each post-processing step adds, on the validation split only.

For every checkpoint given, the validation metrics at the original resolution with the post-processing steps
(busi.model.postprocessing.STEPS) switched on one at a time, in the order the evaluate stage decides them, each
on top of the ones before (a step that excludes another switches it off). The test split is never read: this is
for choosing, the evaluate stage for reporting. The steps that need a crop network (the crop weight) are rows
only where `--crop` names one (train_crop's models_crop/crop.pt).
"""

from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from busi import BusiError
from busi.data.arrays import load_split, read_references
from busi.data.cases import read_originals
from busi.evaluation.metrics import METRICS, lookup
from busi.evaluation.postprocessing import score
from busi.model.crop import load_crop_checkpoint
from busi.model.postprocessing import STEPS, PostProcessing, shown
from busi.model.predictor import Predictor


def ablation_rows(crop: bool = True) -> list[tuple[str, dict]]:
    """(name, the post-processing fields it sets), added in turn: none, then + each step of STEPS at its `on`
    (those at `classes` only with a crop network)."""
    added = [("none", {})]
    for step in (step for step in STEPS if crop or step.point != "classes"):
        excluded = f" ({', '.join(step.excludes)} off)" if step.excludes else ""
        added.append((f"+ {step.name} {shown(step.on)}{excluded}",
                      {step.name: step.on} | {other: False for other in step.excludes}))
    return added


def ablate(models: list[Path], data_dir: Path, masks_dir: Path, threshold: float, crop: Path | None = None,
           raw_dir: Path = Path("data/raw")) -> pd.DataFrame:
    """One row per checkpoint and step: the validation metrics of METRICS (with the crop network `crop` beside
    each checkpoint, cut from the originals in `raw_dir`, where given)."""
    val = load_split(data_dir, "val")
    references = read_references(masks_dir, val)
    originals = read_originals(raw_dir, val["ids"]) if crop else []
    rows = []
    for path in models:
        predictor = Predictor.from_checkpoints([path])
        predictor.crop = load_crop_checkpoint(crop)[0] if crop else None
        predictor.to("cuda" if torch.cuda.is_available() else "cpu")
        if val["images"].shape[1] != predictor.image_size:
            raise BusiError(f"{path}: trained at {predictor.image_size} px, but {data_dir} holds "
                            f"{val['images'].shape[1]} px images; run `dvc repro preprocess` for that size")
        probabilities = {flip: predictor.probabilities(val["images"], flip=flip) for flip in (False, True)}
        step = PostProcessing(threshold=threshold)
        for name, switch in ablation_rows(crop is not None):
            step = replace(step, **switch)
            metrics = score(step, *probabilities[step.flip_tta], val, references, predictor.crops_of(originals))[0]
            epoch = predictor.provenance["checkpoints"][0]["epoch"]
            rows.append({"model": f"{path} (epoch {epoch})", "post-processing": name,
                         **{metric.title: lookup(metrics, metric.key) for metric in METRICS}})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    def cell(value):
        return "" if value is None or pd.isna(value) else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def run(args, params) -> str:
    print(markdown(ablate(args.models, args.data, args.masks, params.evaluate.threshold, args.crop, args.raw)))
    return "validation split only"
