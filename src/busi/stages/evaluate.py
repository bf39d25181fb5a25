"""Stage evaluate: decide the post-processing on the validation split, write the predictor (the trained network +
that post-processing: what predict and serving apply), and score it once on the test split at each image's
original resolution.

The maths live in busi.evaluation (metrics, post-processing, figures), every MLflow call in busi.tracking: this
module only orchestrates and writes the outputs.
"""

import functools
from pathlib import Path

import pandas as pd
import torch

from busi import BusiError, tracking
from busi.config import EvaluateParams
from busi.data.arrays import load_split, read_references
from busi.data.cases import read_originals
from busi.evaluation import figures, postprocessing
from busi.evaluation.metric_files import write_metrics
from busi.evaluation.metrics import CASE_COLUMNS
from busi.files import atomic_file
from busi.model import serving
from busi.model.crop import load_crop_checkpoint
from busi.model.predictor import Predictor

FIGURE_1 = "figure1_loss_iou.png"
FIGURE_2 = "figure2_contours.png"


def evaluate(data_dir: Path, raw_dir: Path, masks_dir: Path, model_dir: Path, crop: Path | None,
             train_metrics_json: Path, history_csv: Path, params: EvaluateParams, out_json: Path, plots_dir: Path,
             figures_dir: Path, val_json: Path, predictor_dir: Path) -> tuple[dict, str]:
    """Write predictor/ (the network, and the crop network where `crop` names one), test.json and val.json (each
    with its _detail.json), the plot CSVs and figures, log them to the training's MLflow run; returns the test
    metrics and the MLflow model URI."""
    run_id = tracking.training_run_id(train_metrics_json)  # before any work: a missing run fails at once
    history = read_history(history_csv)
    if not Path(model_dir).exists():
        raise BusiError(f"{model_dir}: model folder not found; run `dvc repro train`")
    predictor = Predictor.from_checkpoints([Path(model_dir) / "best.pt" if Path(model_dir).is_dir() else model_dir])
    predictor.provenance["mlflow_run_id"] = run_id
    if crop is not None:
        predictor.crop = load_crop_checkpoint(crop)[0]
    predictor.to("cuda" if torch.cuda.is_available() else "cpu")
    val, test = load_split(data_dir, "val"), load_split(data_dir, "test")
    for name, arrays in (("val", val), ("test", test)):
        if arrays["images"].shape[1] != predictor.image_size:
            raise BusiError(f"{model_dir}: trained at {predictor.image_size} px, but {data_dir}/{name}.npz holds "
                            f"{arrays['images'].shape[1]} px images; run `dvc repro preprocess`")
    if not len(test["labels"]):
        raise BusiError(f"{Path(data_dir) / 'test.npz'}: the test split holds no images")

    # Post-processing steps set to auto are decided on the validation split (the default params set them as the
    # OOF predictions of cross-validation decided); experiments are compared on the validation metrics under the
    # result (val.json); the test split only reports.
    # The originals (as predict reads them) for the crop network; the reference masks at their size.
    val_images, test_images = (read_originals(raw_dir, split["ids"]) for split in (val, test))
    val_references, test_references = (read_references(masks_dir, split) for split in (val, test))

    print(f"evaluate: deciding the post-processing on {len(val['labels'])} validation images", flush=True)
    val_probabilities = functools.cache(lambda flip: predictor.probabilities(val["images"], flip=flip))
    val_crops = predictor.crops_of(val_images)
    predictor.postprocessing, decisions = postprocessing.decide(val_probabilities, val, val_references, params,
                                                                val_crops)
    print(f"evaluate: post-processing {predictor.postprocessing.describe()}; decided on validation: "
          f"{', '.join(decisions) or 'nothing'} (the rest as params set it)", flush=True)
    val_metrics = (postprocessing.score(predictor.postprocessing, *val_probabilities(predictor.postprocessing.flip_tta),
                                        val, val_references, val_crops)[0] if len(val["labels"]) else {"images": 0})

    print(f"evaluate: scoring {len(test['labels'])} test images", flush=True)
    scored = postprocessing.score_split(predictor.postprocessing, predictor.probabilities(test["images"]), test,
                                        test_references, params, crop=predictor.crops_of(test_images))
    metrics, cases = scored.metrics, scored.cases
    metrics["postprocessing"] = predictor.postprocessing.to_dict() | {"decisions": decisions}

    predictor.save(predictor_dir)
    for path, content in ((out_json, metrics), (val_json, val_metrics)):
        write_metrics(path, content)
    scored.write_cases(Path(plots_dir) / "per_image.csv")
    with atomic_file(Path(plots_dir) / "confusion.csv") as tmp:
        pd.DataFrame({"actual": cases["label"], "predicted": cases["predicted_label"]}).to_csv(tmp, index=False)
    drawn = {FIGURE_1: figures.training_figure(history), FIGURE_2: scored.figure}
    for name, figure in drawn.items():
        with atomic_file(Path(figures_dir) / name) as tmp:
            figure.savefig(tmp, format="png", dpi=120)  # the temporary name has no .png to infer it from
    print(f"evaluate: logging to MLflow run {run_id}", flush=True)
    model_uri = tracking.log_evaluation(run_id, metrics, val_metrics, tables(metrics, cases), drawn, predictor_dir,
                                       serving)
    return metrics, model_uri


def tables(metrics: dict, cases: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The MLflow tables: the test metrics overall and per class, and the per-image cases."""
    overall = {"class": "all", **{k: v for k, v in metrics.items() if not isinstance(v, dict)}}
    per_class = [{"class": name, **values} for name, values in metrics["per_class"].items()]
    return {"test_metrics.json": pd.DataFrame([overall, *per_class]), "test_per_image.json": cases[CASE_COLUMNS]}


def read_history(history_csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(history_csv)
    except (OSError, ValueError) as err:
        raise BusiError(f"{history_csv}: cannot read the training history ({err}); run `dvc repro train`") from None


def run(args, params) -> str:
    metrics, model_uri = evaluate(args.data, args.raw, args.masks, args.model, args.crop, args.train_metrics,
                                  args.history, params.evaluate, args.out, args.plots, args.figures, args.val_out,
                                  args.predictor)
    return (f"test dice {metrics.get('dice', float('nan')):.3f}, iou {metrics.get('iou', float('nan')):.3f}, "
            f"f1_weighted {metrics['f1_weighted']:.3f}; predictor in {args.predictor}, MLflow model {model_uri}")
