"""The recipes of a grid compared on the folds all of them have finished, before the grid is done.

    PYTHONPATH=src python bench/finished_folds.py --grid grid.yaml --out cvfull [--params params.yaml]
    PYTHONPATH=src python bench/paired.py cvfull/<a>/finished_folds/oof_per_image.csv \
        cvfull/<b>/finished_folds/oof_per_image.csv --splits data/splits.csv

A full-budget grid takes hours on a 2-core CPU; `busi cross-validate --grid` trains it fold by
fold and resumes it. Meanwhile: for each recipe of the grid (`<out>/<name>`), the folds that every recipe has
finished with its params predict their held-out images, the post-processing is decided on those rows (with the
recipe's evaluate section) as cross-validate decides it on all of them, and the per-image table goes to
`<out>/<name>/finished_folds/`. Without the crop network (cross-validate trains it once every fold is done), so
the benign-vs-malignant figures are the class head's, and so is which masks the class empties where the
post-processing lets it: a preview, not a recipe's OOF figures.
"""

import argparse
import functools
from pathlib import Path

import numpy as np

from busi.config import load_grid, load_params
from busi.data.arrays import load_split, read_references
from busi.distributed import subset
from busi.evaluation import postprocessing
from busi.evaluation.metrics import CASE_COLUMNS
from busi.model.predictor import Predictor
from busi.stages.cross_validate import concatenate, folds_of
from busi.training import is_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, required=True, help="the grid file busi cross-validate trains")
    parser.add_argument("--out", type=Path, required=True, help="its --out folder")
    parser.add_argument("--params", default="params.yaml", help="the params the grid changes")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--masks", type=Path, default=Path("data/masks"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    args = parser.parse_args()

    grid = load_grid(args.grid, load_params(args.params))
    pool = concatenate(load_split(args.data, "train"), load_split(args.data, "val"))
    fold_of = folds_of(pool["ids"], args.splits)
    finished = [fold for fold in sorted(set(fold_of.tolist()))
                if all(is_trained(args.out / name / "folds" / f"fold-{fold}", config) for name, config in grid.items())]
    if not finished:
        raise SystemExit(f"{args.out}: no fold is finished by every recipe of {args.grid}")
    rows = np.flatnonzero(np.isin(fold_of, finished))  # the held-out images of those folds, in pool order
    held = subset(pool, rows)
    pool_references = read_references(args.masks, pool)
    references = [pool_references[i] for i in rows]
    print(f"folds {finished}: {len(rows)} held-out images")

    for name, config in grid.items():
        recipe = args.out / name
        predictors = {fold: Predictor.from_checkpoints([recipe / "folds" / f"fold-{fold}" / "best.pt"])
                      for fold in finished}

        @functools.cache  # decide asks for each view many times
        def probabilities(flip: bool, predictors=predictors) -> tuple[np.ndarray, np.ndarray]:
            masks = np.empty(held["images"].shape, np.float32)
            classes = np.empty((len(rows), 3), np.float32)
            for fold, predictor in predictors.items():  # each fold's network on its own held-out images
                at = fold_of[rows] == fold
                masks[at], classes[at] = predictor.probabilities(held["images"][at], flip=flip)
            return masks, classes

        chosen, _ = postprocessing.decide(probabilities, held, references, config.evaluate)
        metrics, cases, _ = postprocessing.score(chosen, *probabilities(chosen.flip_tta), held, references)
        out = recipe / "finished_folds"
        out.mkdir(exist_ok=True)
        cases[CASE_COLUMNS].to_csv(out / "oof_per_image.csv", index=False, float_format="%.6f")
        figures = ", ".join(f"{metric} {metrics[metric]:.3f}" for metric in
                            ("f1_weighted", "dice_per_image", "auc_malignant_vs_benign", "normal_fp_rate", "ece"))
        print(f"{recipe}: {figures} ({chosen.describe()}) -> {out / 'oof_per_image.csv'}")


if __name__ == "__main__":
    main()
