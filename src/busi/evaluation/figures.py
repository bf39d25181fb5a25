"""Figures of an evaluation: the study's Figure 1 (training curves) and Figure 2 (best and worst test cases)."""

import cv2
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state
from matplotlib.ticker import MaxNLocator

from busi import CLASSES


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


def cases_figure(cases: pd.DataFrame, arrays: dict, references: list, predictions: list, count: int,
                 title: str = "Test cases") -> Figure:
    """Figure 2: per class present, the `count` best and worst cases (by Dice; normal images by predicted area),
    reference contour green, prediction red, at the original resolution."""
    present = [name for name in CLASSES if (cases["label"] == name).any()] or list(CLASSES)
    fig = Figure(figsize=(2.6 * 2 * count, 2.8 * len(present)), layout="constrained")
    axes = fig.subplots(len(present), 2 * count, squeeze=False)
    fig.suptitle(f"{title}, best {count} then worst {count} per class: reference green, prediction red")
    for row, name in zip(axes, present, strict=True):
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
