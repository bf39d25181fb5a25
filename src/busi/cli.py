"""busi: lesion segmentation and classification on breast ultrasound (BUSI).

The pipeline's stages (dvc.yaml runs them in order; `dvc repro` is the usual way):
  source, fetch, merge-masks, split, preprocess, train, train-crop, evaluate, evaluate-external
and the tools around them: cross-validate, predict, report, ablate, check-metrics.
Run `busi <command> --help` for one command. `python -m busi` is the same program.
"""

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

from busi import BusiError
from busi.config import load_params
from busi.data.layouts import LAYOUTS
from busi.model.postprocessing import STEPS, step_settings

# Commands that read params.yaml; the others run from any directory without one.
# source runs first on every `dvc repro` (always_changed): validating the whole file there stops a mistyped or
# unknown key before DVC removes any stage's outputs, even a key no stage depends on.
NEEDS_PARAMS = {"source", "fetch", "split", "preprocess", "train", "train-crop", "cross-validate", "evaluate",
                "evaluate-external", "ablate"}


# The pipeline's files, as the options of the commands that read them (`--data data/processed`, ...).
PIPELINE_FILES = {
    "raw": ("data/raw", "fetch's output"),
    "masks": ("data/masks", "merge-masks' output"),
    "splits": ("data/splits.csv", "split's output"),
    "data": ("data/processed", "preprocess' output"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help (none for options without one)."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="busi", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file, for the commands that read one (also accepted after the command)")
    # --params after the command too; SUPPRESS keeps the default above when it is not given there.
    params_after = argparse.ArgumentParser(add_help=False)
    params_after.add_argument("--params", type=Path, default=argparse.SUPPRESS,
                              help="parameters file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, details: str = "", reads: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        parents = [params_after] if name in NEEDS_PARAMS else []
        cmd = commands.add_parser(name, help=summary, description=f"{summary}.\n\n{details}".strip(),
                                  formatter_class=HelpFormatter, parents=parents)
        for option in reads:  # the pipeline files it reads
            default, what = PIPELINE_FILES[option]
            cmd.add_argument(f"--{option}", type=Path, default=Path(default), help=what)
        return cmd

    cmd = command("source", "fingerprint the archive's content for DVC (stage source)",
                  "The archive is $BUSI_ARCHIVE (a .zip or an extracted folder) or, when it is unset, Kaggle's\n"
                  "public copy. A changed archive changes the fingerprint, and `dvc repro` re-runs fetch.")
    cmd.add_argument("--out", type=Path, default=Path("data/source.json"), help="the fingerprint (JSON)")

    cmd = command("fetch", "fetch and verify the raw dataset (stage fetch)",
                  "Reads $BUSI_ARCHIVE (a .zip or an extracted folder, e.g.\n"
                  "BUSI_ARCHIVE=~/Downloads/Dataset_BUSI_with_GT.zip), else downloads Kaggle's public copy\n"
                  "(aryashah2k/breast-ultrasound-images-dataset; fails fast offline). Its layout is params' dataset\n"
                  "section: BUSI's class folders, or your own folders of images and masks with a labels CSV.\n"
                  "Every image and mask is checked before the previous output is replaced.")
    cmd.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder")

    cmd = command("merge-masks", "OR each image's mask files into one 0/255 mask (stage merge_masks)",
                  reads=("raw",))
    cmd.add_argument("--out", type=Path, default=Path("data/masks"), help="output folder")

    cmd = command("split", "group-aware stratified train/val/test split and cross-validation folds (stage split)",
                  "Copies of one scan (re-crops, re-scales) are found and kept in one split; params: split.",
                  reads=("raw",))
    cmd.add_argument("--out", type=Path, default=Path("data/splits.csv"), help="one row per image: split, fold")
    cmd.add_argument("--report", type=Path, default=Path("metrics/split.json"), help="counts, copies, conflicts")

    cmd = command("preprocess", "grayscale, resize and pack each split into one .npz (stage preprocess)",
                  "Images bilinear, masks nearest, to preprocess.image_size.",
                  reads=("raw", "masks", "splits"))
    cmd.add_argument("--out", type=Path, default=Path("data/processed"), help="output folder")

    cmd = command("train", "train the U-Net, tracked in MLflow, resumable (stage train)",
                  "Params: model, augment, train. A killed training resumes from last.pt when the params are the\n"
                  "same. Records go to MLflow (./mlflow.db or $MLFLOW_TRACKING_URI).",
                  reads=("data",))
    cmd.add_argument("--out", type=Path, default=Path("models"), help="checkpoint folder (best.pt, last.pt)")
    cmd.add_argument("--metrics", type=Path, default=Path("metrics/train.json"), help="summary: best epoch, run id")
    cmd.add_argument("--history", type=Path, default=Path("metrics/train_history.csv"), help="per-epoch curves")

    cmd = command("train-crop", "train the crop network on the training split's lesions (stage train_crop)",
                  "benign against malignant on the square around each lesion, cut from the original image\n"
                  "(busi.model.crop). Params: crop.",
                  reads=("raw", "masks", "splits"))
    cmd.add_argument("--out", type=Path, default=Path("models_crop/crop.pt"), help="the crop network's checkpoint")
    cmd.add_argument("--metrics", type=Path, default=Path("metrics/train_crop.json"), help="summary")

    cmd = command("evaluate", "decide the post-processing on validation, score the test split (stage evaluate)",
                  "Metrics at the original resolution with 95% intervals, plots, figures, and the predictor (the\n"
                  "model predict and serving use), all also logged to the training's MLflow run.",
                  reads=("raw", "masks", "data"))
    cmd.add_argument("--model", type=Path, default=Path("models"), help="train's checkpoint folder")
    cmd.add_argument("--crop", type=Path, default=None,
                     help="train_crop's checkpoint (models_crop/crop.pt): the predictor carries it")
    cmd.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"), help="train's summary")
    cmd.add_argument("--history", type=Path, default=Path("metrics/train_history.csv"), help="train's curves")
    cmd.add_argument("--out", type=Path, default=Path("metrics/test.json"),
                     help="test metrics: the headline; all of them in <stem>_detail.json beside it")
    cmd.add_argument("--val-out", type=Path, default=Path("metrics/val.json"),
                     help="the validation split's metrics under the chosen post-processing (compare runs on these); "
                     "all of them in <stem>_detail.json beside it")
    cmd.add_argument("--plots", type=Path, default=Path("metrics/plots"), help="per-image CSV, confusion CSV")
    cmd.add_argument("--figures", type=Path, default=Path("reports/figures"), help="the study's figures")
    cmd.add_argument("--predictor", type=Path, default=Path("predictor"),
                     help="where to write the predictor: the network + its post-processing")

    cmd = command("evaluate-external", "score a trained model on an external dataset, beside its BUSI test metrics",
                  "The dataset is params' external.<NAME> (a folder or .zip in the busi or the folders layout);\n"
                  "nothing is trained or decided on it. Writes <NAME>.json, <NAME>_detail.json and\n"
                  "<NAME>_per_image.csv in --out and a figure of the best and worst cases, and logs them to the\n"
                  "model's MLflow run as external_<NAME>/. The DVC stage evaluate_external runs it for every\n"
                  "configured dataset.",
                  reads=("splits",))
    cmd.add_argument("name", help="the dataset's name under external: in params")
    cmd.add_argument("--model", default="predictor", help="the evaluate stage's predictor folder, another "
                     "predictor (cv/results/predictor), or an MLflow model URI")
    cmd.add_argument("--out", type=Path, default=Path("metrics/external"), help="metrics and per-image CSV")
    cmd.add_argument("--figures", type=Path, default=Path("reports/figures"), help="where the figure goes")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"),
                     help="fetch's output: its train and val images must not be in the dataset")
    cmd.add_argument("--no-mlflow", action="store_true",
                     help="neither log to MLflow nor compare with the BUSI test metrics (a model without a run)")

    cmd = command("cross-validate", "train every fold of train+val, score the fold ensemble once on test",
                  "The stage of cv/dvc.yaml (`dvc repro cv/dvc.yaml`). Each fold is an MLflow child run of one\n"
                  "parent run; the post-processing is decided on the out-of-fold predictions.",
                  reads=("raw", "masks", "data"))
    cmd.add_argument("--splits", type=Path, default=Path("data/splits.csv"), help="split's output (its fold column)")
    cmd.add_argument("--out", type=Path, default=Path("cv/results"),
                     help="folds/ (checkpoints), predictor/ (the fold ensemble), cv.json, test.json, per_image.csv")
    cmd.add_argument("--grid", type=Path,
                     help="a grid file (cv/study.yaml: name -> parameter changes): every configuration's folds at "
                     "once, each in <out>/<name>; on Ray when RAY_ADDRESS is set (docs/team.md)")
    cmd.add_argument("--cpus-per-fold", type=float, default=1, help="on Ray: the CPU threads a fold asks for")
    cmd.add_argument("--gpus-per-fold", type=float, default=0,
                     help="on Ray: the share of a GPU a fold asks for (0.25: four folds share one GPU)")

    cmd = command("predict", "masks, overlays, labels and class probabilities for your own images",
                  "Applies a predictor (the network(s) and the post-processing evaluate decided) to PNG or\n"
                  "JPEG files of any size; writes <name>_mask.png, <name>_overlay.png and predictions.jsonl.\n"
                  "Example: busi predict scans/ --out predictions/")
    cmd.add_argument("inputs", nargs="+", type=Path, help="image files (PNG, JPEG) or folders of them")
    cmd.add_argument("--model", default="predictor", help="the evaluate stage's predictor folder, another "
                     "predictor (cv/results/predictor), a training checkpoint folder/file, or an MLflow model URI")
    cmd.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    steps = cmd.add_argument_group("post-processing", "default: what the model carries")
    steps.add_argument("--threshold", type=float, default=None, help="on the lesion probability")
    for step in STEPS:  # --flip-tta/--no-flip-tta, --min-lesion-area 0.005, ...
        kind = {"action": argparse.BooleanOptionalAction} if type(step.on) is bool else {"type": float}
        steps.add_argument(f"--{step.name.replace('_', '-')}", default=None, help=step.help, **kind)

    cmd = command("report", "the study's comparison table and figures from every MLflow run",
                  "Writes the markdown report and its curves figure, and logs both to the experiment's\n"
                  "study-report run. Reads ./mlflow.db or $MLFLOW_TRACKING_URI.")
    cmd.add_argument("--out", type=Path, default=Path("reports/runs.md"),
                     help="the markdown report (default: reports/runs.md, never the committed reports/study.md)")
    cmd.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or busi)")
    cmd.add_argument("--where", default="", help="only the runs that pass this MLflow search filter, e.g. "
                     "\"params.`train.epochs` = '3'\" (default: every run)")
    cmd.add_argument("--baseline", default=None, help="run name of the recipe the recipe table compares others "
                     "with (default: the oldest cross-validation with out-of-fold predictions)")

    cmd = command("ablate", "validation metrics as each post-processing step is added (never the test split)",
                  reads=("raw", "masks", "data"))
    cmd.add_argument("models", nargs="+", type=Path, help="checkpoint folders or files")
    cmd.add_argument("--crop", type=Path, default=None,
                     help="a crop network (models_crop/crop.pt) beside each checkpoint: adds the crop weight's row")

    cmd = command("check-metrics", "fail when test metrics drop below a baseline beyond tolerance (the CI gate)")
    cmd.add_argument("new", type=Path, help="new metrics JSON (e.g. metrics/test.json)")
    cmd.add_argument("--baseline", type=Path, required=True, help="committed baseline metrics JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    # SIGTERM (a timeout, a cancelled CI job, `dvc queue kill`) ends a command as Ctrl-C does: the MLflow run is
    # closed as KILLED, an evaluation being logged leaves its training run FINISHED, temporary files go.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        params = load_params(args.params) if args.command in NEEDS_PARAMS else None  # validated before any work
        if params:
            check_tables(args.params, params)
        summary = run(args, params)
    except BusiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"{args.command}: stopped ({err or 'interrupted'})", file=sys.stderr)
        return 130
    except Exception:  # a bug or a library's failure: its traceback, without the tracking credentials
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    print(f"{args.command}: {summary} ({time.perf_counter() - started:.1f} s)")
    return 0


def check_tables(path: Path, params) -> None:
    """The parameters whose choices are the library's tables: evaluate.postprocessing (the steps of
    busi.model.postprocessing.STEPS) and each dataset's layout (busi.data.layouts.LAYOUTS). Checked here, with the
    rest of params.yaml before any stage runs, rather than in busi.config, which every stage imports: for a
    stage that does not use them this is validation only (its outputs do not depend on the tables), so its
    dvc.yaml deps need not list them."""
    try:
        step_settings(params.evaluate.postprocessing)
    except ValueError as err:
        raise BusiError(f"{path}: {err}") from None
    datasets = {"dataset": params.dataset} | {f"external.{name}": d for name, d in params.external.items()}
    for where, dataset in datasets.items():
        if dataset.layout not in LAYOUTS:
            raise BusiError(f"{path}: {where}.layout: {dataset.layout!r} is not a layout (layouts: "
                            f"{', '.join(LAYOUTS)})")


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def redact(text: str) -> str:
    """`text` with the tracking URI's user, password and query replaced as busi.tracking.shown_uri shows them."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urlparse(uri)
    if not (parts.username or parts.password or parts.query):
        return text
    from busi.tracking import shown_uri

    text = text.replace(uri, shown_uri(uri))
    for secret in (parts.password, parts.query):
        if secret:
            text = text.replace(secret, "***")
    return text


# Each command's module, imported on demand (each pulls in only what it needs; torch is slow to import). Its
# `run(args, params)` reads the parsed arguments, calls the library and returns the one-line summary.
COMMANDS = {
    "source": "busi.stages.source", "fetch": "busi.stages.fetch", "merge-masks": "busi.stages.merge_masks",
    "split": "busi.stages.split", "preprocess": "busi.stages.preprocess", "train": "busi.stages.train",
    "train-crop": "busi.stages.train_crop", "evaluate": "busi.stages.evaluate",
    "evaluate-external": "busi.stages.evaluate_external",
    "cross-validate": "busi.stages.cross_validate", "predict": "busi.commands.predict",
    "report": "busi.commands.report", "ablate": "busi.commands.ablate", "check-metrics": "busi.commands.check_metrics",
}


def run(args: argparse.Namespace, params) -> str:
    return importlib.import_module(COMMANDS[args.command]).run(args, params)
