"""Stage evaluate_external: score a trained model on a dataset it was never trained or selected on (another
hospital, another scanner), without retraining, beside its BUSI test metrics so that the drop is visible.

The model is the predictor that predict and serving apply (the network(s) + the post-processing chosen on
BUSI's validation split): nothing is decided on the external data. The dataset (params: external.<name>, in
the busi or the folders layout) is read from its folder or .zip with the same checks as fetch. Outputs, in
`--out`: <name>.json (the headline), <name>_detail.json (per class, confusion, 95% intervals, and the BUSI test
metrics of the same model with the differences), <name>_per_image.csv, and the figure of the best and worst
cases; all also logged to the model's MLflow run in the section external_<name>.
"""

import csv
import tempfile
from pathlib import Path

import numpy as np

from busi import CLASSES, BusiError
from busi.config import EvaluateParams, ExternalDataset
from busi.data.archive import file_sha256, refuse_links, safe_extract
from busi.data.cases import INDEX, MANIFEST, find_root, read_case, read_cases, scan
from busi.evaluation import postprocessing
from busi.evaluation.metric_files import write_metrics
from busi.evaluation.metrics import CASE_COLUMNS
from busi.files import atomic_file

MAX_IMAGES = 100_000  # an external set of 100,000 images at most (each image is within busi.data.images.MAX_PIXELS)


def evaluate_external(name: str, dataset: ExternalDataset, model: str, params: EvaluateParams, out_dir: Path,
                      figures_dir: Path, log: bool = True, raw_dir: Path = Path("data/raw"),
                      splits_csv: Path = Path("data/splits.csv")) -> dict:
    """Write the metrics, per-image CSV and figure of `model` on the external dataset `name`; log them to the
    model's MLflow run unless `log` is False. Returns the metrics with the BUSI comparison. `raw_dir` and
    `splits_csv`: the training data (fetch's and split's outputs), where the leak check looks."""
    from busi import tracking  # slow to import
    from busi.model.predictor import load_model

    predictor = load_model(model)
    run = tracking.model_run(predictor.provenance.get("mlflow_run_id"), model) if log else None
    arrays, references = read_dataset(dataset, predictor.resize, seen_images(raw_dir, splits_csv),
                                      originals=predictor.crop is not None)
    counts = ", ".join(f"{np.count_nonzero(arrays['labels'] == i)} {c}" for i, c in enumerate(CLASSES))
    print(f"evaluate-external: {name}: {len(references)} images ({counts}); "
          f"{predictor.postprocessing.describe()} (chosen on BUSI validation)", flush=True)
    # Images of one patient are not independent: where the dataset names the patients (arrays["groups"]), the
    # bootstrap draws whole patients.
    scored = postprocessing.score_split(predictor.postprocessing, predictor.probabilities(arrays["images"]), arrays,
                                        references, params, title=f"External: {name}",
                                        crop=predictor.crops_of(arrays.get("originals", [])))
    metrics, cases = scored.metrics, scored.cases
    if run is not None:
        busi_test = {key: tracking.metric(run, "test", key) for key, value in metrics.items()
                     if isinstance(value, int | float) and key != "images"}
        metrics["busi_test"] = {key: value for key, value in busi_test.items() if value is not None}
        metrics["difference"] = {key: metrics[key] - value for key, value in metrics["busi_test"].items()}
    out_dir, figures_dir = Path(out_dir), Path(figures_dir)
    write_metrics(out_dir / f"{name}.json", metrics)
    scored.write_cases(out_dir / f"{name}_per_image.csv")
    with atomic_file(figures_dir / f"external_{name}_cases.png") as tmp:
        scored.figure.savefig(tmp, format="png", dpi=120)
    print(comparison_table(metrics))
    if run is not None:
        print(f"evaluate-external: logging to MLflow run {run.info.run_id} as {tracking.external_section(name)}/",
              flush=True)
        tracking.log_external(run.info.run_id, name, {k: v for k, v in metrics.items()
                                                      if k not in ("busi_test", "difference")},
                              cases[CASE_COLUMNS], scored.figure)
    return metrics


def seen_images(raw_dir: Path, splits_csv: Path) -> dict[str, str]:
    """{sha256: image id} of the images the model was trained or selected on (train and val of the split), from
    fetch's manifest; empty where the training data is not here."""
    raw_dir = Path(raw_dir)
    if not all(path.is_file() for path in (raw_dir / INDEX, raw_dir / MANIFEST, Path(splits_csv))):
        print(f"evaluate-external: no training data at {raw_dir} and {splits_csv}: not checked for images the "
              "model has seen", flush=True)
        return {}
    with Path(splits_csv).open(newline="") as f:
        seen = {row["image_id"] for row in csv.DictReader(f) if row["split"] != "test"}
    with (raw_dir / MANIFEST).open(newline="") as f:
        sha = {row["path"]: row["sha256"] for row in csv.DictReader(f)}
    return {sha[case.image.relative_to(raw_dir).as_posix()]: case.image_id for case in read_cases(raw_dir)
            if case.image_id in seen}


def read_dataset(dataset: ExternalDataset, resize, seen: dict[str, str],
                 originals: bool = False) -> tuple[dict, list[np.ndarray]]:
    """The dataset's images at the model's size (`resize`), with ids, labels, groups and original sizes (and,
    with `originals`, the images as they are: for a crop network), and the reference masks at the original size.
    A .zip is unpacked to a temporary folder, inside it only. An image byte-identical to one of `seen` (sha256:
    training image id) is refused: the check must be of unseen data."""
    path = Path(dataset.path).expanduser()
    if not path.exists():
        raise BusiError(f"{path}: no such folder or .zip (params: external dataset path)")
    with tempfile.TemporaryDirectory(prefix="busi-external-") as tmp:
        if path.is_dir():
            refuse_links(path)
            folder = path
        else:
            safe_extract(path, Path(tmp))
            folder = Path(tmp)
        try:
            cases = scan(find_root(folder, dataset), dataset)
            if len(cases) > MAX_IMAGES:
                raise BusiError(f"{path}: {len(cases):,} images, more than the limit of {MAX_IMAGES:,}")
            leaked = [(case.image_id, seen[digest]) for case in cases if (digest := file_sha256(case.image)) in seen]
            if leaked:
                raise BusiError(f"{path}: {len(leaked)} images are byte-identical to images the model was trained "
                                f"or selected on (e.g. {leaked[0][0]!r} = {leaked[0][1]!r}): an external dataset "
                                "must be unseen")
            images, references, kept = [], [], []
            for case in cases:
                image, mask = read_case(case)
                images.append(resize(image))
                references.append(mask)
                kept += [image] if originals else []
        except BusiError as err:  # name the member of the user's archive, not the temporary folder
            raise BusiError(str(err).replace(f"{tmp}/", f"{path}: ")) from None
    arrays = {"images": np.stack(images), "ids": np.array([case.image_id for case in cases]),
              "labels": np.array([CLASSES.index(case.label) for case in cases], dtype=np.int64),
              "groups": [case.group for case in cases],
              "sizes": np.array([mask.shape for mask in references], dtype=np.int32)}
    if originals:
        arrays["originals"] = kept
    return arrays, references


def comparison_table(metrics: dict) -> str:
    """The headline beside the same model's BUSI test metrics, one line per metric."""
    busi = metrics.get("busi_test", {})
    lines = [f"{'metric':<26}{'external':>10}{'BUSI test':>11}{'difference':>12}"]
    for key, value in metrics.items():
        if isinstance(value, int | float) and key != "images":
            other = busi.get(key)
            lines.append(f"{key:<26}{value:>10.3f}" + (f"{other:>11.3f}{value - other:>+12.3f}" if other is not None
                                                      else f"{'–':>11}{'–':>12}"))
    return "\n".join(lines)


def run(args, params) -> str:
    if args.name not in params.external:
        raise BusiError(f"{args.params}: external.{args.name}: not configured (configured: "
                        f"{', '.join(params.external) or 'none'})")
    metrics = evaluate_external(args.name, params.external[args.name], args.model, params.evaluate, args.out,
                                args.figures, log=not args.no_mlflow, raw_dir=args.raw, splits_csv=args.splits)
    return (f"{args.name}: dice {metrics.get('dice', float('nan')):.3f}, dice_per_image "
            f"{metrics.get('dice_per_image', float('nan')):.3f}, f1_weighted {metrics['f1_weighted']:.3f}; "
            f"in {args.out}")
