"""`python -m busi report`: the study's comparison table and the validation curves of every MLflow run.

Reads the experiment's FINISHED runs: their params (logged flattened by busi.tracking), their per-epoch
validation curves, and the test and validation metrics that the evaluate stage logs into the training run
(named and read back by busi.tracking). Writes
reports/runs.md (or --out) with one row per evaluated run beside the study's own Table 1, and
its <stem>_val_curves.png, both also logged to the experiment's `study-report` run. Finished runs without
any test metric are listed under the table as not evaluated.

Runs scored on external datasets (`busi evaluate-external`) get a table of those scores beside their BUSI test
split's.

Cross-validated configurations (`python -m busi cross-validate`: a parent run whose children are the folds) get
a table of their own: the fold mean ± sd on validation, the fold ensemble's test metrics with 95% intervals, the
time, and each row's paired comparison with the best row (by mean validation Dice) on the same test images
(busi.evaluation.metrics.paired_bootstrap).
"""

import math
import os
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run

from busi import BusiError, tracking
from busi.evaluation.metrics import METRICS, PROBABILITY_COLUMNS, bootstrap_ci, paired_bootstrap, summary
from busi.files import atomic_file

# The study's Table 1, test split, as printed there: model, IoU, Dice, pixel accuracy, weighted F1.
STUDY = [["VGG16 + attention", "0.41", "0.58", "0.95", "0.877"],
         ["VGG19 + attention", "0.51", "0.67", "0.95", "0.82"],
         ["ResNet50 + attention", "0.50", "0.66", "0.95", "0.82"],
         ["ResNet50, no attention", "0.43", "0.60", "0.95", "0.80"],
         ["DPN68 + attention", "0.59", "0.74", "0.96", "0.81"]]
CURVES = [("val_loss", "validation loss"), ("val_iou", "validation IoU")]
PAIRED_RESAMPLES, PAIRED_SEED = 2000, 0


def report(out_md: Path, experiment: str | None = None, where: str = "", baseline: str | None = None) -> Path:
    """Write the table to `out_md` and the curves to `<stem>_val_curves.png` beside it, and log both to the
    experiment's `study-report` run; returns `out_md`."""
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "busi"
    finished, unfinished, uri = tracking.finished_runs(name, where)
    cross_validated = [run for run in finished if tracking.cv_metric(run, "dice", "mean") is not None]
    # Folds are shown through their parent; parents have no curves of their own.
    finished = [run for run in finished if "mlflow.parentRunId" not in run.data.tags and run not in cross_validated]
    curves = read_curves(finished)
    figure = Path(out_md).with_name(f"{Path(out_md).stem}_val_curves.png")
    with atomic_file(figure) as tmp:
        plot_curves(finished, curves).savefig(tmp, format="png", dpi=120)  # tmp has no .png suffix
    text = markdown(name, uri, finished, curves, unfinished, figure.name, where)
    if cross_validated:
        text = text.replace("## The study's Table 1", cv_section(cross_validated) + "## The study's Table 1", 1)
    recipes = recipe_section(cross_validated, baseline)
    if recipes:
        text = text.replace("## The study's Table 1", recipes + "## The study's Table 1", 1)
    external = [run for run in [*cross_validated, *finished] if tracking.external_datasets(run)]
    if external:
        text = text.replace("## The study's Table 1", external_section(external) + "## The study's Table 1", 1)
    with atomic_file(out_md) as tmp:
        tmp.write_text(text)
    tracking.log_report(name, [Path(out_md), figure])
    return Path(out_md)


def read_curves(runs: list[Run]) -> dict[str, dict[str, dict[int, float]]]:
    """{run id: {metric: {epoch: value}}} for the plotted metrics and the monitor that picked the best epoch."""
    plotted = [key for key, _ in CURVES]
    return {run.info.run_id: {key: tracking.metric_history(run.info.run_id, key)
                              for key in {*plotted, monitor(run)} - {"last"}} for run in runs}


def monitor(run: Run) -> str:
    return run.data.params.get("train.monitor", "val_dice")


def epochs(run: Run, curves: dict[str, dict[int, float]]) -> str:
    """Epochs trained / the epoch the checkpoint kept: the monitor's first best value, as train.py picks it (the
    last epoch with monitor "last")."""
    values = curves["val_loss" if monitor(run) == "last" else monitor(run)]
    if not values:
        return "?"
    if monitor(run) == "last":
        return f"{len(values)} / {max(values)}"
    pick = min if monitor(run).endswith("loss") else max  # train.py minimises val_loss, maximises the rest
    best = pick(values.values())
    return f"{len(values)} / {min(step for step, value in values.items() if value == best)}"


def markdown(name: str, uri: str, finished: list[Run], curves: dict, unfinished: int, figure: str,
             where: str = "") -> str:
    # Ranked on validation, where choices are made.
    evaluated = sorted((run for run in finished if is_evaluated(run)), reverse=True,
                       key=lambda run: (rank(tracking.metric(run, "val_eval", "dice")),
                                        rank(tracking.metric(run, "test", "dice"))))
    not_evaluated = [run for run in finished if not is_evaluated(run)]
    header = ["run", "encoder", "attention", "weights", "size", "epochs (run / best)", "val Dice", "val F1",
              *(metric.title for metric in METRICS)]
    rows = [[f"{run.info.run_name} (`{run.info.run_id[:8]}`)", param(run, "model.encoder"),
             param(run, "model.attention"), param(run, "model.encoder_weights"),
             param(run, "preprocess.image_size"), epochs(run, curves[run.info.run_id]),
             *(plain(tracking.metric(run, "val_eval", key)) for key in ("dice", "f1_weighted")),
             *(with_interval(run, metric.key) for metric in METRICS)] for run in evaluated]
    lines = [
        "# BUSI segmentation: our runs beside the study",
        "",
        f"MLflow experiment `{name}`{f' (runs where `{where}`)' if where else ''} ({uri}): {len(finished)} finished "
        f"runs, {len(evaluated)} evaluated"
        + (f"; left out: {unfinished} runs not finished (running, failed or killed)." if unfinished else "."),
        "",
        "## Test split",
        "",
        "Validation Dice and weighted F1 (what runs are chosen on; best validation Dice first), then the test",
        "metrics as the evaluate stage logged them, with 95% bootstrap intervals in brackets.",
        "",
        *(table(header, rows) if rows else ["No run has test metrics yet: run the evaluate stage."]),
        "",
    ]
    if not_evaluated:
        lines += ["Not evaluated (no test metrics; their curves are in the figure): "
                  + ", ".join(f"{run.info.run_name} (`{run.info.run_id[:8]}`)" for run in not_evaluated) + ".", ""]
    lines += [
        "## The study's Table 1 (test split), for reference",
        "",
        *table(["model", *(metric.title for metric in METRICS[:4])], STUDY),  # the study's columns
        "",
        "## Validation curves",
        "",
        f"![validation loss and IoU per epoch of every finished run]({figure})",
        "",
    ]
    return "\n".join(lines)


def cv_section(runs: list[Run]) -> str:
    """The cross-validated configurations, best mean validation Dice first, each compared with the best."""
    runs = sorted(runs, key=lambda run: tracking.cv_metric(run, "dice", "mean"), reverse=True)
    cases = {run.info.run_id: tracking.load_table(run.info.run_id, "test_per_image.json") for run in runs}
    best = runs[0]
    header = ["run", "encoder", "attention", "size", "folds", "val Dice (mean ± sd)", "val F1 (mean ± sd)",
              "test IoU", "test Dice", "test weighted F1", "minutes",
              *(f"Δ {name} vs best [95% CI], p" for name in ("Dice", "F1"))]
    rows = []
    for run in runs:
        if run is best:
            paired = ["(best)", "(best)"]
        elif cases[run.info.run_id] is None or cases[best.info.run_id] is None:
            paired = ["no per-image table", ""]
        else:
            try:
                comparison = paired_bootstrap(cases[run.info.run_id], cases[best.info.run_id], PAIRED_RESAMPLES,
                                              PAIRED_SEED)
                paired = [difference(comparison[name]) for name in ("dice", "f1_weighted")]
            except ValueError:
                paired = ["other test images", ""]
        rows.append([f"{run.info.run_name} (`{run.info.run_id[:8]}`)", param(run, "model.encoder"),
                     param(run, "model.attention"), param(run, "preprocess.image_size"),
                     param(run, "split.folds"), *(mean_sd(run, key) for key in ("dice", "f1_weighted")),
                     *(with_interval(run, key) for key in ("iou", "dice", "f1_weighted")),
                     plain(tracking.cv_metric(run, "", "minutes")), *paired])
    return "\n".join([
        "## Cross-validated configurations (fold ensembles)",
        "",
        "Mean ± sd over the folds of train+val (each fold validated by the network that did not train on it),",
        "then the fold ensemble's test metrics with 95% bootstrap intervals, and the paired difference with the",
        "best row on the same test images (paired bootstrap; * = the interval excludes zero: beyond noise).",
        "",
        *table(header, rows),
        "",
        "",
    ])


RECIPE_METRICS = [("f1_weighted", "weighted F1"), ("dice_per_image", "per-image Dice"),
                  ("auc_malignant_vs_benign", "malignant AUC"), ("normal_fp_rate", "normal FP rate"), ("ece", "ECE")]
# the recipe table's paired differences (metrics of METRICS)
RECIPE_PAIRED = ("f1_weighted", "dice_per_image", "auc_malignant_vs_benign")
LEVER_SECTIONS = ("preprocess.", "model.", "augment.", "train.", "evaluate.")
RECIPE_RESAMPLES = 1000


def recipe_section(runs: list[Run], baseline: str | None) -> str:
    """The recipes, judged on their out-of-fold predictions (every train+val image, predicted by the fold that did
    not train on it): per recipe the parameters that differ from the baseline recipe (the lever), its OOF
    metrics with 95% bootstrap intervals, and its paired difference with the baseline on the same images.
    The baseline is the run named `baseline`, else the oldest cross-validation with OOF predictions."""
    tables = {run.info.run_id: tracking.load_table(run.info.run_id, "oof_per_image.json") for run in runs}
    runs = sorted((run for run in runs if tables[run.info.run_id] is not None), key=lambda run: run.info.start_time)
    if not runs:
        return ""
    named = [run for run in runs if run.info.run_name == baseline]
    if baseline and not named:
        raise BusiError(f"--baseline {baseline!r}: no cross-validated run of that name has out-of-fold predictions")
    base = (named or runs)[0]
    header = ["recipe (what differs from the baseline)", "images",
              *(f"{title} [95% CI]" for _, title in RECIPE_METRICS),
              *(f"Δ {metric.title} vs baseline [95% CI], p" for metric in METRICS if metric.key in RECIPE_PAIRED)]
    rows = []
    for run in [base, *(run for run in runs if run is not base)]:
        cases = tables[run.info.run_id]
        metrics = summary(cases, cases[PROBABILITY_COLUMNS].to_numpy(float))
        intervals = bootstrap_ci(cases, RECIPE_RESAMPLES, PAIRED_SEED)
        if run is base:
            paired = ["(baseline)"] * len(RECIPE_PAIRED)
        else:
            comparison = paired_bootstrap(cases, tables[base.info.run_id], PAIRED_RESAMPLES, PAIRED_SEED)
            paired = [difference(comparison[key]) for key in RECIPE_PAIRED]
        rows.append([f"{run.info.run_name} (`{run.info.run_id[:8]}`): {lever(run, base)}", str(len(cases)),
                     *(interval_cell(metrics.get(key), intervals.get(key)) for key, _ in RECIPE_METRICS), *paired])
    return "\n".join([
        "## Recipes, judged on out-of-fold predictions",
        "",
        "Each recipe cross-validated on train+val; every image predicted by the fold that did not train on it, the",
        "post-processing decided on those predictions. 95% bootstrap intervals over images; Δ: the paired",
        "difference with the baseline on the same images (* = the interval excludes zero). Lower is better for",
        "the normal FP rate (normal images with a lesion drawn) and ECE (expected calibration error).",
        "",
        *table(header, rows),
        "",
        "",
    ])


def lever(run: Run, base: Run) -> str:
    """The parameters of `run` that differ from `base` (a parameter `base` did not log is not a difference)."""
    if run is base:
        return "baseline"
    changed = [f"{key}={value}" for key, value in sorted(run.data.params.items())
               if key.startswith(LEVER_SECTIONS) and key in base.data.params and base.data.params[key] != value]
    return ", ".join(changed) or "same parameters"


def interval_cell(value: float | None, interval: dict | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]" if interval else f"{value:.3f}"


def difference(comparison: dict) -> str:
    beyond_noise = comparison["low"] > 0 or comparison["high"] < 0
    return (f"{comparison['difference']:+.3f} [{comparison['low']:+.3f}, {comparison['high']:+.3f}], "
            f"p {comparison['p']:.3f}" + (" *" if beyond_noise else ""))


EXTERNAL = [("dice", "Dice"), ("dice_per_image", "per-image Dice"), ("auc_malignant_vs_benign", "malignant AUC"),
            ("f1_weighted", "weighted F1")]


def external_section(runs: list[Run]) -> str:
    """Per run and external dataset: each metric of EXTERNAL on BUSI's test split, then on the external data."""
    header = ["run", "dataset", "images", *(f"{title}: BUSI test → external [95% CI]" for _, title in EXTERNAL)]
    rows = []
    for run in runs:
        for dataset in tracking.external_datasets(run):
            section = tracking.external_section(dataset)
            rows.append([f"{run.info.run_name} (`{run.info.run_id[:8]}`)", dataset,
                         f"{number(tracking.metric(run, section, 'images')):.0f}",
                         *(f"{plain(tracking.metric(run, 'test', key))} → {with_interval(run, key, section)}"
                           for key, _ in EXTERNAL)])
    return "\n".join([
        "## External datasets",
        "",
        "Each model on data it never saw (`busi evaluate-external`: another hospital or scanner), beside its own",
        "BUSI test split: the drop is what leaving BUSI costs.",
        "",
        *table(header, rows),
        "",
        "",
    ])


def mean_sd(run: Run, key: str) -> str:
    return f"{number(tracking.cv_metric(run, key, 'mean')):.3f} ± {number(tracking.cv_metric(run, key, 'sd')):.3f}"


def is_evaluated(run: Run) -> bool:
    # Any test metric: evaluate leaves Dice and IoU out when the test split has no lesion at all.
    return tracking.has_evaluation(run)


def param(run: Run, key: str) -> str:
    value = run.data.params.get(key, "?")
    return "none" if value == "None" else value  # a null in params.yaml is logged as "None"


def rank(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def number(value: float | None) -> float:
    return math.nan if value is None else value


def plain(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def with_interval(run: Run, key: str, split: str = "test") -> str:
    value = tracking.metric(run, split, key)
    if value is None or math.isnan(value):
        return "–"
    low, high = tracking.metric(run, split, key, "low"), tracking.metric(run, split, key, "high")
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{value:.3f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def plot_curves(runs: list[Run], curves: dict[str, dict[str, dict[int, float]]]) -> Figure:
    """One panel per validation metric, one line per run."""
    fig = Figure(figsize=(5 * len(CURVES), 4), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for run in runs:
            values = curves[run.info.run_id][key]
            label = f"{run.info.run_name} ({run.info.run_id[:8]})"
            ax.plot(list(values), list(values.values()), marker=".", label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if axes[-1].has_data():
        axes[-1].legend(fontsize="small")
    return fig


def run(args, params) -> str:
    return f"wrote {report(args.out, args.experiment, args.where, args.baseline)}"
