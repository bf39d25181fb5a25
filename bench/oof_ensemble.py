"""Does a second network pay, judged on out-of-fold (OOF) predictions rather than on the test split? Two or more
finished cross-validations over the same folds (e.g. the default recipe at 128 px and at 160 px), their fold
networks averaged: each train+val image predicted by the networks, one per cross-validation, that did not see it.

    PYTHONPATH=src python bench/oof_ensemble.py cvb/imgdice:data/processed cv160/r160:p160 --out ens

Each argument is CV_DIR:DATA, a cross-validation's output and the preprocess output its networks were trained at
(the same images and folds, at that cross-validation's size). Lesion maps are resized to the first one's size
and averaged, as are the class probabilities; the crop network is the first cross-validation's (each fold's).
The post-processing is decided on the averaged OOF exactly as `busi cross-validate` decides it (params'
`evaluate` section, every step `auto` but the crop weight), its temperature fitted on the averaged
probabilities, so the ensemble is calibrated as a whole. Writes `<out>/oof_per_image.csv`, to pair with each
cross-validation's own (bench/paired.py); with `--alone`, each cross-validation is also decided and scored
here, on the first one's size, as `<out>/oof_per_image_<k>.csv`. About 8 minutes on a 2-core CPU, 5 more per
cross-validation with --alone.
"""

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from busi.config import load_params
from busi.data.arrays import load_split, read_references
from busi.data.cases import read_originals
from busi.evaluation import postprocessing
from busi.evaluation.metrics import value
from busi.model.crop import load_crop_checkpoint
from busi.model.predictor import Predictor
from busi.stages.cross_validate import concatenate, folds_of

SHOWN = ("f1_weighted", "dice_per_image", "dice", "auc_malignant_vs_benign", "normal_fp_rate", "ece")


def oof_probabilities(cv_dir: Path, data_dir: Path, fold_of: np.ndarray, ids: np.ndarray, size: int) -> dict:
    """{flip: (lesion maps [N,size,size], class probabilities [N,3])}: each image by the fold that held it out."""
    pool = concatenate(load_split(data_dir, "train"), load_split(data_dir, "val"))
    if not np.array_equal(pool["ids"], ids):
        raise SystemExit(f"{data_dir}: not the same train+val images, in the same order, as the first one's")
    out = {flip: (np.zeros((len(ids), size, size), np.float32), np.zeros((len(ids), 3))) for flip in (False, True)}
    for fold in sorted(set(fold_of.tolist())):
        rows = np.flatnonzero(fold_of == fold)
        predictor = Predictor.from_checkpoints([cv_dir / "folds" / f"fold-{fold}" / "best.pt"])
        for flip, (maps, classes) in out.items():
            fold_maps, classes[rows] = predictor.probabilities(pool["images"][rows], flip=flip)
            maps[rows] = [cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in fold_maps]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cvs", nargs="+", help="CV_DIR:DATA, the first one's size and crop networks are used")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--masks", type=Path, default=Path("data/masks"))
    parser.add_argument("--alone", action="store_true", help="also each cross-validation alone, decided here")
    args = parser.parse_args()
    cvs = [(Path(cv), Path(data)) for cv, _, data in (arg.partition(":") for arg in args.cvs)]
    params = load_params(args.params).evaluate
    params = params.model_copy(update={"postprocessing": {step: "auto" for step in params.postprocessing}
                                       | {"crop_weight": params.postprocessing.get("crop_weight", "auto")}})

    first_cv, first_data = cvs[0]
    pool = concatenate(load_split(first_data, "train"), load_split(first_data, "val"))
    fold_of = folds_of(pool["ids"], args.splits)
    size = pool["images"].shape[-1]
    references = read_references(args.masks, pool)
    originals = read_originals(args.raw, pool["ids"])
    crops = {fold: load_crop_checkpoint(first_cv / "folds" / f"fold-{fold}" / "crop.pt")[0]
             for fold in sorted(set(fold_of.tolist()))}

    def crop(masks: list[np.ndarray]) -> np.ndarray:  # each fold's crop network on its held-out images
        malignant = np.full(len(masks), np.nan)
        for fold, network in crops.items():
            rows = np.flatnonzero(fold_of == fold)
            malignant[rows] = network.malignant([originals[i] for i in rows], [masks[i] for i in rows])
        return malignant

    alone = [oof_probabilities(cv, data, fold_of, pool["ids"], size) for cv, data in cvs]
    averaged = {flip: tuple(np.mean([a[flip][part] for a in alone], axis=0) for part in (0, 1))
                for flip in (False, True)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, probabilities in [*((f"_{k}", a) for k, a in enumerate(alone) if args.alone), ("", averaged)]:
        chosen, _ = postprocessing.decide(lambda flip, p=probabilities: p[flip], pool, references, params, crop)
        _, cases, _ = postprocessing.score(chosen, *probabilities[chosen.flip_tta], pool, references, crop)
        cases.to_csv(args.out / f"oof_per_image{name}.csv", index=False, float_format="%.6f")
        label = f"{cvs[int(name[1:])][0]} alone" if name else f"the ensemble of {len(cvs)}"
        if name and (cvs[int(name[1:])][0] / "oof_per_image.csv").is_file():  # as its cross-validation scored it?
            own = pd.read_csv(cvs[int(name[1:])][0] / "oof_per_image.csv", dtype={"image_id": str})
            same = own["predicted_label"].to_numpy() == cases.set_index("image_id").loc[own["image_id"],
                                                                                        "predicted_label"].to_numpy()
            label += f" (the same label as its cross-validation's OOF on {same.mean():.1%} of images)"
        print(f"{label}: {', '.join(f'{key} {value(cases, key):.3f}' for key in SHOWN)}\n  ({chosen.describe()})",
              flush=True)


if __name__ == "__main__":
    main()
