"""Where a cross-validated recipe's mask errors are: the lesion images it draws no lesion on, and the normal
images it draws one on. Before trying a lever on them: are they small lesions (a larger image size would help),
near-misses of the threshold (a lower threshold or a confidence rule would), or images the networks are sure
about (neither would)? Are they the same scans for another recipe (the data's hard cases) or its own? And
where the class gates the mask (mask_from_label): what would calling normal at a lower normal probability
trade, normal images no longer drawn on against lesion images emptied?

    PYTHONPATH=src python bench/oof_errors.py cv50/crop [--other cv50/global] [--data data/processed]

Reads `<cv>/oof_per_image.csv` (the OOF masks under the chosen post-processing) and each fold's
`<cv>/folds/fold-<k>/best.pt`, which draws its held-out images' lesion probability maps again (about 20 s on a
CPU, without flip TTA); the copy groups and folds from data/splits.csv. Prints the figures.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from busi.data.arrays import load_split
from busi.model.predictor import Predictor
from busi.stages.cross_validate import concatenate, folds_of

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
NORMAL_AT = (0.3, 0.2, 0.1, 0.05)  # normal probabilities to call normal at, besides where it is the likeliest
PERCENTILES = (10, 25, 50, 75, 90)


def highest_probabilities(cv_dir: Path, data_dir: Path, splits_csv: Path) -> pd.Series:
    """Each train+val image's highest lesion probability, from the fold network that did not see it."""
    pool = concatenate(load_split(data_dir, "train"), load_split(data_dir, "val"))
    fold_of = folds_of(pool["ids"], splits_csv)
    highest = np.zeros(len(fold_of))
    for fold in sorted(set(fold_of.tolist())):
        held = fold_of == fold
        predictor = Predictor.from_checkpoints([cv_dir / "folds" / f"fold-{fold}" / "best.pt"])
        maps, _ = predictor.probabilities(pool["images"][held], flip=False)
        highest[held] = maps.reshape(len(maps), -1).max(1)
    return pd.Series(highest, index=pool["ids"])


def errors(cases: pd.DataFrame) -> dict[str, pd.Series]:
    lesion = cases["label"] != "normal"
    drawn = cases["predicted_area_px"] > 0
    return {"lesion images, none drawn": lesion & ~drawn, "lesion images, drawn": lesion & drawn,
            "normal images, one drawn": ~lesion & drawn, "normal images, none drawn": ~lesion & ~drawn}


def spread(values: pd.Series) -> str:
    return " / ".join(f"{v:.3g}" for v in np.percentile(values, PERCENTILES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv", type=Path, help="a busi cross-validate output folder")
    parser.add_argument("--other", type=Path, help="another recipe's cross-validate folder, same split")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    args = parser.parse_args()

    cases = pd.read_csv(args.cv / "oof_per_image.csv", dtype={"image_id": str}).set_index("image_id")
    groups = pd.read_csv(args.splits, dtype={"image_id": str}).set_index("image_id")["group"]
    cases["highest"] = highest_probabilities(args.cv, args.data, args.splits)
    cases["lesion_share"] = cases["lesion_area_px"] / cases[["tp", "fp", "fn", "tn"]].sum(axis=1)
    kinds = errors(cases)

    print(f"{len(cases)} OOF images of {args.cv}; percentiles {'/'.join(map(str, PERCENTILES))}")
    print("| images | count | scans (copy groups) | highest lesion probability | reference lesion, share of image |")
    print("|---|---|---|---|---|")
    for name, rows in kinds.items():
        share = spread(cases.loc[rows, "lesion_share"]) if name.startswith("lesion") else "-"
        print(f"| {name} | {rows.sum()} | {groups[cases.index[rows]].nunique()} | "
              f"{spread(cases.loc[rows, 'highest'])} | {share} |")

    print("\n| threshold | lesion images missed that reach it | normal images that reach it |\n|---|---|---|")
    normal = cases["label"] == "normal"
    for t in THRESHOLDS:
        reached = cases["highest"] >= t
        print(f"| {t} | {(kinds['lesion images, none drawn'] & reached).sum()} | {(normal & reached).sum()} |")

    # An image called normal has its mask emptied (mask_from_label), so its Dice is exact here: 0 on a lesion image.
    print("\n| called normal also at p_normal >= | normal images drawn on | lesion images called normal | "
          "per-image Dice, lesion images |\n|---|---|---|---|")
    lesion = ~normal
    for t in (None, *NORMAL_AT):
        called = cases["predicted_label"].eq("normal") | (cases["p_normal"] >= t if t else False)
        dice = cases["dice"].where(~called, 0.0)
        print(f"| {t or 'as chosen'} | {(normal & ~called & (cases['predicted_area_px'] > 0)).sum()} | "
              f"{(lesion & called).sum()} | {dice[lesion].mean():.3f} |")

    if args.other:
        other = errors(pd.read_csv(args.other / "oof_per_image.csv", dtype={"image_id": str})
                       .set_index("image_id").loc[cases.index])
        print(f"\n| against {args.other} | this recipe | the other | both |\n|---|---|---|---|")
        for name in ("lesion images, none drawn", "normal images, one drawn"):
            print(f"| {name} | {kinds[name].sum()} | {other[name].sum()} | {(kinds[name] & other[name]).sum()} |")


if __name__ == "__main__":
    main()
