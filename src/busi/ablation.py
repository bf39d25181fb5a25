"""`python -m busi ablate`: what each post-processing step adds, on the validation split only.

For every checkpoint given, the validation metrics at the original resolution with the post-processing steps
switched on one at a time, in the order the evaluate stage decides them: none, + flip TTA, + largest component,
+ labels from the mask. The test split is never read: this is for choosing, the evaluate stage for reporting.
"""

from pathlib import Path

import pandas as pd
import torch

from busi import BusiError
from busi.data import load_split
from busi.evaluate import split_metrics
from busi.inference import predict_arrays
from busi.model import load_checkpoint

STEPS = [  # (name, flip_tta, largest_component, label_from_mask)
    ("none", False, False, False),
    ("+ flip TTA", True, False, False),
    ("+ largest component", True, True, False),
    ("+ labels from the mask", True, True, True),
]
COLUMNS = ["dice", "iou", "pixel_accuracy", "dice_per_image", "f1_weighted", "accuracy", "normal_fp_rate"]


def ablate(models: list[Path], data_dir: Path, masks_dir: Path, threshold: float) -> pd.DataFrame:
    """One row per checkpoint and step: the validation metrics (and malignant Dice)."""
    rows = []
    for path in models:
        model, params, state = load_checkpoint(path)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        val = load_split(data_dir, "val")
        if val["images"].shape[1] != params.preprocess.image_size:
            raise BusiError(f"{path}: trained at {params.preprocess.image_size} px, but {data_dir} holds "
                             f"{val['images'].shape[1]} px images; run `dvc repro preprocess` for that size")
        predictions = {flip: predict_arrays(model, val["images"], flip=flip) for flip in (False, True)}
        for step, flip, largest, from_mask in STEPS:
            metrics = split_metrics(*predictions[flip], val, masks_dir, threshold, largest, from_mask)[0]
            rows.append({"model": f"{path} (epoch {state.get('epoch')})", "post-processing": step,
                         **{name: metrics.get(name) for name in COLUMNS},
                         "malignant_dice": metrics["per_class"]["malignant"].get("dice")})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    def cell(value):
        return "" if value is None or pd.isna(value) else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
