"""Stage cross_validate (cv/dvc.yaml, not part of the default `dvc repro`): the params' configuration trained on
every fold of train+val, and its fold ensemble scored once on the test split, as nnU-Net reports a model.

1. For each fold of data/splits.csv (group-aware, stratified: copies of a scan never straddle two folds), train
   on the other folds and validate on it (busi.training: each fold is an MLflow child run), here or as Ray tasks
   (busi.distributed); a grid file trains several configurations' folds at once. A fold keeps its last epoch
   (`fold_params`): its validation images are the held-out ones, which must not choose what scores them.
2. Each fold's crop network (busi.model.crop) learns on the same training images, here, after the folds
   (`folds/fold-<k>/crop.pt`, kept while params' crop section is the same).
3. Predict every train+val image with the networks that did not see it: the out-of-fold (OOF) predictions.
   The post-processing is decided on them (busi.evaluation.postprocessing.decide), as evaluate decides it on the
   validation split; each fold's metrics under it give the mean ± sd.
4. The fold ensemble: every fold's network and crop network, probabilities averaged, with that post-processing,
   is one predictor (`<out>/predictor`, and the parent run's MLflow model) that predict and serving use like a
   single model; scored once on the test split, with 95% bootstrap intervals.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from busi import BusiError, tracking
from busi.config import Params, load_grid
from busi.crop_training import train_crop_network
from busi.data.arrays import load_split, read_references
from busi.data.cases import read_originals
from busi.distributed import FoldJob, on_ray, run_folds, subset
from busi.evaluation import postprocessing
from busi.evaluation.metrics import CASE_COLUMNS, keys, value
from busi.files import atomic_file
from busi.model import serving
from busi.model.crop import CropClassifier, load_crop_checkpoint, save_crop_checkpoint
from busi.model.postprocessing import step_settings
from busi.model.predictor import Predictor
from busi.training import is_trained


def cross_validate(data_dir: Path, splits_csv: Path, masks_dir: Path, params: Params, out_dir: Path,
                   grid: dict[str, Params] | None = None, cpus: float = 1, gpus: float = 0,
                   raw_dir: Path = Path("data/raw")) -> dict:
    """Train every fold, decide the post-processing on the OOF predictions, write and score the fold ensemble;
    returns the summary written to `<out_dir>/cv.json`. With a `grid` ({name: params}), every configuration's
    folds train at once (on Ray, busi.distributed, when RAY_ADDRESS is set), each configuration in
    `<out_dir>/<name>`; returns {name: summary}."""
    started = time.perf_counter()
    configs = {name: fold_params(config, name) for name, config in (grid or {"": params}).items()}
    pool = concatenate(load_split(data_dir, "train"), load_split(data_dir, "val"))
    test = load_split(data_dir, "test")
    fold_of = folds_of(pool["ids"], splits_csv)
    folds = sorted(set(fold_of.tolist()))
    if len(folds) < 2:
        raise BusiError(f"{splits_csv}: train+val holds {len(folds)} fold(s); cross-validation needs at least 2")
    parents = {name: tracking.start_parent_run(config, suffix=f"-cv{len(folds)}{f'-{name}' if name else ''}")
               for name, config in configs.items()}
    try:
        jobs = []
        for fold in folds:  # fold by fold: a grid stopped part-way has every configuration's first folds, paired
            for name, config in configs.items():
                fold_dir = Path(out_dir) / name / "folds" / f"fold-{fold}"
                if is_trained(fold_dir, config):  # a re-run (after a kill, or to rescore) keeps the finished folds
                    print(f"cross-validate: {name or 'fold'} {fold} already trained with these params ({fold_dir})")
                else:
                    jobs.append(FoldJob(config, fold, fold_of != fold, parents[name], f"-fold{fold}", fold_dir))
        where = "as Ray tasks" if on_ray() else "here, one after the other"
        print(f"cross-validate: {len(jobs)} folds to train ({len(configs)} configuration(s) x {len(folds)} folds) "
              f"{where}", flush=True)
        run_folds(jobs, pool, cpus, gpus)
        originals = {"pool": read_originals(raw_dir, pool["ids"]), "test": read_originals(raw_dir, test["ids"])}
        crop_files: dict[str, Path] = {}  # the grid's configurations share each fold's crop network
        results = {name: score_folds(pool, fold_of, folds, test, masks_dir, config, Path(out_dir) / name,
                                     parents[name], started, originals, crop_files)
                   for name, config in configs.items()}
    except BaseException as err:
        for parent in parents.values():
            if tracking.run_status(parent) == "RUNNING":
                tracking.end_parent_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return results if grid else results[""]


def fold_params(params: Params, name: str = "") -> Params:
    """A fold's training params: the recipe's, with the last epoch kept (`train.monitor: last`). A fold validates
    on its held-out images, whose OOF predictions judge the recipe: a checkpoint picked, or a training stopped,
    on them would be scored on the images that chose it (nnU-Net, too, scores a fold's final weights)."""
    if params.train.scheduler == "plateau":
        raise BusiError(f"{f'grid entry {name!r}: ' if name else ''}train.scheduler: plateau lowers the learning "
                        "rate on the validation metric, which in a fold is the held-out images the OOF predictions "
                        "score; cross-validate with scheduler: cosine")
    return params.model_copy(update={"train": params.train.model_copy(update={"monitor": "last"})})


def score_folds(pool: dict, fold_of: np.ndarray, folds: list[int], test: dict, masks_dir: Path, params: Params,
                out_dir: Path, parent: str, started: float, originals: dict[str, list[np.ndarray]],
                crop_files: dict[str, Path]) -> dict:
    """The OOF predictions of one configuration's trained folds (with their crop networks, trained here where
    missing), the post-processing decided on them, the fold ensemble scored on test; everything written to
    `out_dir` and logged to the `parent` run. `originals`: the images of pool and test at their own size;
    `crop_files`: the crop networks this grid holds so far (fold_crop_network)."""
    pool_references = read_references(masks_dir, pool)
    crops = [fold_crop_network(out_dir / "folds" / f"fold-{fold}", fold_of != fold, pool, originals["pool"],
                               pool_references, params, crop_files) for fold in folds]
    networks, configs, oof = [], [], {flip: [] for flip in (False, True)}
    for fold in folds:
        held = fold_of == fold
        fold_predictor = Predictor.from_checkpoints([out_dir / "folds" / f"fold-{fold}" / "best.pt"])
        fold_predictor.to("cuda" if torch.cuda.is_available() else "cpu")
        for flip in (False, True):
            oof[flip].append(fold_predictor.probabilities(pool["images"][held], flip=flip))
        networks += fold_predictor.networks
        configs += fold_predictor.configs

    order = np.concatenate([np.flatnonzero(fold_of == fold) for fold in folds])  # OOF rows are in fold order
    pool = subset(pool, order)
    fold_of = fold_of[order]
    stacked = {flip: tuple(np.concatenate(part) for part in zip(*oof[flip], strict=True)) for flip in oof}
    references = [pool_references[i] for i in order]
    images = [originals["pool"][i] for i in order]

    def oof_crops(masks: list[np.ndarray]) -> np.ndarray:  # each fold's crop network on its held-out images
        malignant = np.full(len(masks), np.nan)
        for fold, crop in zip(folds, crops, strict=True):
            rows = np.flatnonzero(fold_of == fold)
            malignant[rows] = crop.malignant([images[i] for i in rows], [masks[i] for i in rows])
        return malignant

    chosen, decisions = postprocessing.decide(lambda flip: stacked[flip], pool, references, params.evaluate,
                                              oof_crops)
    print(f"cross-validate: chosen on the out-of-fold predictions: {chosen.describe()}", flush=True)
    oof_metrics, oof_cases, _ = postprocessing.score(chosen, *stacked[chosen.flip_tta], pool, references, oof_crops)
    per_fold = [fold_metrics(oof_cases[fold_of == fold]) for fold in folds]

    ensemble = Predictor(networks, configs, chosen, {"mlflow_run_id": parent, "folds": folds,
                                                     "checkpoints": [f"folds/fold-{f}/best.pt" for f in folds]},
                         CropClassifier([crop.networks[0] for crop in crops], crops[0].config))
    print(f"cross-validate: scoring the {len(folds)}-fold ensemble on {len(test['labels'])} test images",
          flush=True)
    scored = postprocessing.score_split(chosen, ensemble.probabilities(test["images"]), test,
                                        read_references(masks_dir, test), params.evaluate,
                                        crop=ensemble.crops_of(originals["test"]))
    metrics, cases = scored.metrics, scored.cases
    metrics["postprocessing"] = chosen.to_dict() | {"decisions": decisions}
    result = {"folds": len(folds), "minutes": round((time.perf_counter() - started) / 60, 2),
               "mean": {name: float(np.nanmean([f.get(name, np.nan) for f in per_fold])) for name in keys("fold")},
               "sd": {name: float(np.nanstd([f.get(name, np.nan) for f in per_fold], ddof=1))
                      for name in keys("fold")},
               "per_fold": dict(zip(map(str, folds), per_fold, strict=True)), "oof": oof_metrics}
    write_outputs(out_dir, ensemble, result, metrics, cases, oof_cases)
    drawn = {"figure2_contours.png": scored.figure}
    tables = {"test_per_image.json": cases[CASE_COLUMNS], "oof_per_image.json": oof_cases[CASE_COLUMNS]}
    model_uri = tracking.log_evaluation(parent, metrics, oof_metrics, tables, drawn, out_dir / "predictor",
                                        serving, cv=result)
    return result | {"test": metrics, "run_id": parent, "model_uri": model_uri}



def fold_crop_network(fold_dir: Path, rows: np.ndarray, pool: dict, originals: list[np.ndarray],
                      references: list[np.ndarray], params: Params, crop_files: dict[str, Path]) -> CropClassifier:
    """The fold's crop network, trained on the pool's `rows` (its training images) unless `fold_dir/crop.pt`
    holds one of these crop params already. Trained here, one fold after another, not on Ray: it needs the
    original images, and takes minutes where a fold's U-Net takes most of an hour on a CPU. It learns from the
    fold's images and reference masks, not from the configuration's U-Net, so a grid trains it once per fold
    and crop params: `crop_files` maps those to the file, which another configuration copies."""
    path = fold_dir / "crop.pt"
    key = json.dumps([fold_dir.name, params.crop.model_dump()], sort_keys=True)
    if crop_files.get(key, path) != path:
        with atomic_file(path) as tmp:
            shutil.copyfile(crop_files[key], tmp)
    crop_files[key] = path
    if path.is_file():
        crop, state = load_crop_checkpoint(path)
        if state.get("params") == params.crop.model_dump():
            return crop
    rows = np.flatnonzero(rows)
    print(f"cross-validate: training {fold_dir.name}'s crop network on {len(rows)} images", flush=True)
    crop, summary = train_crop_network([originals[i] for i in rows], [references[i] for i in rows],
                                       pool["labels"][rows], params.crop)
    save_crop_checkpoint(path, crop, summary=summary, params=params.crop.model_dump())
    return crop


def folds_of(ids: np.ndarray, splits_csv: Path) -> np.ndarray:
    try:
        table = pd.read_csv(splits_csv, dtype={"image_id": str})
        fold = dict(zip(table["image_id"], table["fold"].astype(int), strict=True))
    except (OSError, ValueError, KeyError) as err:
        raise BusiError(f"{splits_csv}: cannot read the folds ({type(err).__name__}: {err}); "
                        "run `dvc repro split`") from None
    missing = [str(i) for i in ids if fold.get(str(i), -1) < 0]
    if missing:
        raise BusiError(f"{splits_csv}: {len(missing)} train/val images have no fold (e.g. {missing[0]!r}); "
                        "run `dvc repro split preprocess`")
    return np.array([fold[str(i)] for i in ids])


def concatenate(*splits: dict) -> dict:
    return {key: np.concatenate([split[key] for split in splits]) for key in splits[0]}


def fold_metrics(cases: pd.DataFrame) -> dict:
    """The `fold` metrics of METRICS on one fold's held-out images (those defined there)."""
    values = {name: value(cases, name) for name in keys("fold")}
    return {name: v for name, v in values.items() if not np.isnan(v)}


def write_outputs(out_dir: Path, ensemble: Predictor, result: dict, metrics: dict, cases: pd.DataFrame,
                  oof_cases: pd.DataFrame) -> None:
    """The ensemble, cv.json (folds and OOF metrics), test.json and the per-image tables of test and OOF (what
    recipes are compared on, image by image: `busi report`'s recipe table)."""
    ensemble.save(out_dir / "predictor")
    with atomic_file(out_dir / "cv.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_file(out_dir / "test.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    for name, table in (("per_image.csv", cases), ("oof_per_image.csv", oof_cases)):
        with atomic_file(out_dir / name) as tmp:
            table[CASE_COLUMNS].to_csv(tmp, index=False, float_format="%.6f")


def run(args, params: Params) -> str:
    grid = load_grid(args.grid, params) if args.grid else None
    for name, config in (grid or {}).items():  # before any fold trains
        try:
            step_settings(config.evaluate.postprocessing)
        except ValueError as err:
            raise BusiError(f"{args.grid}: {name}: {err}") from None
    result = cross_validate(args.data, args.splits, args.masks, params, args.out, grid, args.cpus_per_fold,
                            args.gpus_per_fold, args.raw)
    if grid:
        return "; ".join(f"{name}: validation dice {r['mean']['dice']:.3f}, ensemble test dice "
                         f"{r['test']['dice']:.3f} (MLflow run {r['run_id']})" for name, r in result.items())
    folds = ", ".join(f"{k} {result['mean'][k]:.3f} ± {result['sd'][k]:.3f}" for k in ("dice", "f1_weighted"))
    return (f"{result['folds']} folds, validation {folds}; ensemble test dice {result['test']['dice']:.3f}, "
            f"f1_weighted {result['test']['f1_weighted']:.3f}; MLflow run {result['run_id']}")
