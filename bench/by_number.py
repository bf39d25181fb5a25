"""Where along the archive the errors are: per-image tables broken down by the number in BUSI's file names
("benign (214)"), in bins of consecutive numbers. BUSI's images of one class were numbered as they were
collected, so a block of similar scans (one view, one kind of lesion) shows as a run of bins.

    PYTHONPATH=src python bench/by_number.py default=cvfull/default/finished_folds/oof_per_image.csv \
        imgdice=cvfull/imgdice/finished_folds/oof_per_image.csv [--bin 25]

Reads per-image tables as evaluate and cross-validate write them (`image_id`, `label`, `predicted_label`,
`dice`, `predicted_area_px`). Prints, per table and class, each bin's images, its lesion images with no lesion
drawn, its per-image Dice (lesion classes) and how its images were labelled.
"""

import argparse
from pathlib import Path

import pandas as pd

from busi import CLASSES


def by_number(cases: pd.DataFrame, label: str, width: int) -> pd.DataFrame:
    """One row per bin of `width` consecutive file numbers of class `label`."""
    rows = cases[cases["label"] == label].copy()
    number = rows["image_id"].str.extract(r"\((\d+)\)", expand=False).astype(int)
    rows["bin"] = (number - 1) // width * width + 1  # the bin's first number: bins sort as numbers
    rows["none_drawn"] = rows["predicted_area_px"] == 0
    grouped = rows.groupby("bin")
    table = pd.DataFrame({"images": grouped.size(), "none drawn": grouped["none_drawn"].sum(),
                          "per-image Dice": grouped["dice"].mean().round(3)})
    table = table.join(pd.crosstab(rows["bin"], rows["predicted_label"]).reindex(columns=list(CLASSES), fill_value=0)
                       .add_prefix("called "))
    table.index = [f"{first}-{first + width - 1}" for first in table.index]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="NAME=per_image.csv")
    parser.add_argument("--bin", type=int, default=25, help="consecutive file numbers in one bin")
    args = parser.parse_args()
    for spec in args.tables:
        name, _, path = spec.rpartition("=")
        cases = pd.read_csv(Path(path))
        for label in CLASSES:
            table = by_number(cases, label, args.bin)
            if label == "normal":
                table = table.drop(columns="per-image Dice")
            print(f"\n{name or path}: {label}\n{table.to_string()}")


if __name__ == "__main__":
    main()
