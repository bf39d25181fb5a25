"""Stage train (dvc.yaml): the U-Net on the preprocessed arrays, tracked in MLflow, resumable. The training is
busi.training's; this stage runs it on its inputs and says what came out."""

from busi.config import Params
from busi.training import train


def run(args, params: Params) -> str:
    summary = train(args.data, params, args.out, args.metrics, args.history)
    best = ", ".join(f"{k} {v:.3f}" for k, v in summary["best"].items())
    return f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: {best}; MLflow run {summary['run_id']}"
