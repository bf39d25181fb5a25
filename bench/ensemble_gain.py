"""Does averaging help? The fold ensemble of a cross-validation against each of its networks alone, on the test
split, with the same post-processing (the one chosen on the out-of-fold predictions).

    PYTHONPATH=src python bench/ensemble_gain.py [--predictor cv/results/predictor] [--data data/processed]

Prints per network and for the ensemble: test Dice, IoU, per-image Dice, weighted F1, and the paired bootstrap
difference (ensemble minus network) in Dice and weighted F1.
"""

import argparse
from pathlib import Path

from busi.data.arrays import load_split, read_references
from busi.evaluation.metrics import paired_bootstrap
from busi.evaluation.postprocessing import score
from busi.model.predictor import Predictor, load_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, default=Path("cv/results/predictor"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--masks", type=Path, default=Path("data/masks"))
    args = parser.parse_args()
    ensemble = load_predictor(args.predictor)
    test = load_split(args.data, "test")
    references = read_references(args.masks, test)

    def scored(predictor: Predictor):
        metrics, cases, _ = score(predictor.postprocessing, *predictor.probabilities(test["images"]), test, references)
        return metrics, cases

    whole, whole_cases = scored(ensemble)
    print(f"post-processing: {ensemble.postprocessing.describe()}")
    print("| model | Dice | IoU | per-image Dice | weighted F1 | ensemble − model: Dice [95% CI] | F1 [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for i, (network, config) in enumerate(zip(ensemble.networks, ensemble.configs, strict=True)):
        metrics, cases = scored(Predictor([network], [config], ensemble.postprocessing))
        gain = paired_bootstrap(whole_cases, cases, resamples=2000, seed=0)
        print(f"| network {i} | {metrics['dice']:.3f} | {metrics['iou']:.3f} | {metrics['dice_per_image']:.3f} | "
              f"{metrics['f1_weighted']:.3f} | " + " | ".join(
                  f"{g['difference']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" for g in gain.values()) + " |")
    print(f"| ensemble of {len(ensemble.networks)} | {whole['dice']:.3f} | {whole['iou']:.3f} | "
          f"{whole['dice_per_image']:.3f} | {whole['f1_weighted']:.3f} | | |")


if __name__ == "__main__":
    main()
