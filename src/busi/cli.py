"""`python -m busi <command>`: one command per pipeline stage (see dvc.yaml)."""

import argparse
import sys
import time
from pathlib import Path

from busi import BusiError
from busi.config import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busi", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("source", help="fingerprint the archive's content (BUSI_ARCHIVE, else Kaggle) for DVC")
    cmd.add_argument("--out", type=Path, default=Path("data/source.json"))

    cmd = commands.add_parser("fetch", help="fetch and verify the raw BUSI archive: $BUSI_ARCHIVE (a .zip or an "
                              "extracted folder), else Kaggle")
    cmd.add_argument("--out", type=Path, default=Path("data/raw"))

    cmd = commands.add_parser("merge-masks", help="OR every image's mask files into one 0/255 mask")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"))
    cmd.add_argument("--out", type=Path, default=Path("data/masks"))

    cmd = commands.add_parser("split", help="group-aware stratified train/val/test split and folds")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"))
    cmd.add_argument("--out", type=Path, default=Path("data/splits.csv"))
    cmd.add_argument("--report", type=Path, default=Path("metrics/split.json"))

    cmd = commands.add_parser("preprocess", help="grayscale, resize and pack each split into one .npz")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"))
    cmd.add_argument("--masks", type=Path, default=Path("data/masks"))
    cmd.add_argument("--splits", type=Path, default=Path("data/splits.csv"))
    cmd.add_argument("--out", type=Path, default=Path("data/processed"))

    cmd = commands.add_parser("train", help="train the U-Net, tracked in MLflow, resumable")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--out", type=Path, default=Path("models"), help="checkpoint folder (best.pt, last.pt)")
    cmd.add_argument("--metrics", type=Path, default=Path("metrics/train.json"))
    cmd.add_argument("--history", type=Path, default=Path("metrics/train_history.csv"))

    cmd = commands.add_parser("cross-validate", help="train every fold of train+val, score the fold ensemble on test")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--splits", type=Path, default=Path("data/splits.csv"), help="its fold column")
    cmd.add_argument("--masks", type=Path, default=Path("data/masks"))
    cmd.add_argument("--out", type=Path, default=Path("cv/results"),
                     help="folds/ (checkpoints), predictor/ (the fold ensemble), cv.json, test.json, per_image.csv")

    cmd = commands.add_parser("evaluate", help="test-split metrics at the original resolution, plots, MLflow")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--masks", type=Path, default=Path("data/masks"))
    cmd.add_argument("--model", type=Path, default=Path("models"))
    cmd.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    cmd.add_argument("--history", type=Path, default=Path("metrics/train_history.csv"))
    cmd.add_argument("--out", type=Path, default=Path("metrics/test.json"))
    cmd.add_argument("--val-out", type=Path, default=Path("metrics/val.json"),
                     help="the validation split's metrics under the chosen post-processing (compare runs on these)")
    cmd.add_argument("--plots", type=Path, default=Path("metrics/plots"), help="per-image CSV, confusion CSV")
    cmd.add_argument("--figures", type=Path, default=Path("reports/figures"))
    cmd.add_argument("--predictor", type=Path, default=Path("predictor"),
                     help="where to write the predictor: the network + the post-processing chosen on validation")

    cmd = commands.add_parser("report", help="the study's comparison table and figures from every MLflow run")
    cmd.add_argument("--out", type=Path, default=Path("reports/study.md"))
    cmd.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or busi)")

    cmd = commands.add_parser("predict", help="masks, overlays, labels and class probabilities for your own images")
    cmd.add_argument("inputs", nargs="+", type=Path, help="image files (PNG, JPEG) or folders of them")
    cmd.add_argument("--model", default="predictor", help="the evaluate stage's predictor folder (default), another "
                     "predictor, a training checkpoint folder/file, or an MLflow model URI (models:/...)")
    cmd.add_argument("--out", type=Path, required=True, help="output folder")
    steps = cmd.add_argument_group("post-processing", "default: what the model carries (chosen on validation)")
    steps.add_argument("--threshold", type=float, default=None, help="on the lesion probability")
    steps.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                       help="average with the mirrored image (test-time augmentation)")
    steps.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                       help="keep only the largest lesion region")
    steps.add_argument("--label-from-mask", action=argparse.BooleanOptionalAction, default=None,
                       help="no predicted lesion -> normal, else the more probable of benign and malignant")

    cmd = commands.add_parser("ablate", help="validation metrics as each post-processing step is added (no test)")
    cmd.add_argument("models", nargs="+", type=Path, help="checkpoint folders or files")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--masks", type=Path, default=Path("data/masks"))

    cmd = commands.add_parser("check-metrics", help="fail when test metrics drop below a baseline (CI gate)")
    cmd.add_argument("new", type=Path, help="new metrics JSON (e.g. metrics/test.json)")
    cmd.add_argument("--baseline", type=Path, required=True, help="committed baseline metrics JSON")

    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        # Validated before any work starts; predict, report and check-metrics read no params and run anywhere.
        params = None if args.command in ("predict", "report", "check-metrics") else load_params(args.params)
        summary = run(args, params)
    except BusiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.command}: {summary} ({time.perf_counter() - started:.1f} s)")
    return 0


def run(args: argparse.Namespace, params) -> str:
    # Stage modules are imported on demand: each pulls in only what it needs (torch is slow to import).
    if args.command == "source":
        from busi.stages.source import source

        found = source(args.out)
        return f"{found['path']} ({found['kind']}{', sha256 ' + found['sha256'][:12] if 'sha256' in found else ''})"
    if args.command == "fetch":
        from busi.stages.fetch import fetch

        return f"{fetch(args.out)} images verified in {args.out}"
    if args.command == "merge-masks":
        from busi.stages.merge_masks import merge_masks

        return f"{merge_masks(args.raw, args.out)} merged masks in {args.out}"
    if args.command == "split":
        from busi.stages.split import split

        report = split(args.raw, params.split, args.out, args.report)
        totals = ", ".join(f"{s} {c['total']}" for s, c in report["counts"].items())
        return (f"{totals}; {report['groups_with_copies']} groups of copies, "
                f"{report['conflicts']['groups']} conflicts ({params.split.conflicts})")
    if args.command == "preprocess":
        from busi.stages.preprocess import preprocess

        counts = preprocess(args.raw, args.masks, args.splits, params.preprocess.image_size, args.out)
        return ", ".join(f"{s} {n}" for s, n in counts.items()) + f" at {params.preprocess.image_size} px"
    if args.command == "train":
        from busi.stages.train import train

        summary = train(args.data, params, args.out, args.metrics, args.history)
        best = ", ".join(f"{k} {v:.3f}" for k, v in summary["best"].items())
        return f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: {best}; MLflow run {summary['run_id']}"
    if args.command == "cross-validate":
        from busi.stages.cross_validate import cross_validate

        result = cross_validate(args.data, args.splits, args.masks, params, args.out)
        folds = ", ".join(f"{k} {result['mean'][k]:.3f} ± {result['sd'][k]:.3f}" for k in ("dice", "f1_weighted"))
        return (f"{result['folds']} folds, validation {folds}; ensemble test dice {result['test']['dice']:.3f}, "
                f"f1_weighted {result['test']['f1_weighted']:.3f}; MLflow run {result['run_id']}")
    if args.command == "check-metrics":
        from busi.commands.check_metrics import check_metrics

        table, regressed = check_metrics(args.new, args.baseline)
        print(table)
        if regressed:
            raise BusiError(f"metrics regressed beyond tolerance: {', '.join(regressed)}")
        return "no gated metric regressed"
    if args.command == "evaluate":
        from busi.stages.evaluate import evaluate

        metrics, model_uri = evaluate(args.data, args.masks, args.model, args.train_metrics, args.history,
                                      params.evaluate, args.out, args.plots, args.figures, args.val_out, args.predictor)
        return (f"test dice {metrics.get('dice', float('nan')):.3f}, iou {metrics.get('iou', float('nan')):.3f}, "
                f"f1_weighted {metrics['f1_weighted']:.3f}; predictor in {args.predictor}, MLflow model {model_uri}")
    if args.command == "ablate":
        from busi.commands.ablate import ablate, markdown

        print(markdown(ablate(args.models, args.data, args.masks, params.evaluate.threshold)))
        return "validation split only"
    if args.command == "report":
        from busi.commands.report import report

        return f"wrote {report(args.out, args.experiment)}"
    if args.command == "predict":
        from busi.commands.predict import predict

        overrides = {"threshold": args.threshold, "flip_tta": args.flip_tta,
                     "largest_component": args.largest_component, "label_from_mask": args.label_from_mask}
        done, failed, _ = predict(args.inputs, args.model, args.out, overrides)
        if failed:
            raise BusiError(f"{failed} of {done + failed} inputs failed (see above); the rest are in {args.out}")
        return f"{done} images in {args.out}"
    raise AssertionError(args.command)
