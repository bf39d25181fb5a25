"""BUSI rewritten in the folders layout, for the real checks of the generic dataset layer (docs/data.md).

    PYTHONPATH=src python bench/busi_as_folders.py --raw data/raw --out /tmp/busi_folders [--splits data/splits.csv
        --split test]

Writes <out>/images/<id>.png (the original files, byte for byte), <out>/masks/mask_<id>.png (each image's masks
merged, 0/255) and <out>/labels.csv (columns file, diagnosis, patient, source: `patient` is the split's copy
group, `source` an extra column the pipeline ignores). With --splits and --split, only that split's images.

Two checks use it: the test split of a trained model, scored by `busi evaluate-external` as a folders dataset,
must give the evaluate stage's own test metrics (one model, one answer, whatever the layout); and the whole
archive fetched and split in the folders layout, with `patient` as the case column, must give the same split as
BUSI's own layout.
"""

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from busi.data.cases import read_case, read_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="fetch's output, or a BUSI folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", type=Path, help="split's output: its groups become the patient column")
    parser.add_argument("--split", choices=["train", "val", "test"], help="only this split's images")
    args = parser.parse_args()
    rows = list(csv.DictReader(args.splits.open())) if args.splits else []
    group_of = {row["image_id"]: row["group"] for row in rows}
    wanted = {row["image_id"] for row in rows if row["split"] == args.split} if args.split else None
    (args.out / "images").mkdir(parents=True)
    (args.out / "masks").mkdir()
    with (args.out / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "diagnosis", "patient", "source"])
        count = 0
        for case in read_cases(args.raw):
            if wanted is not None and case.image_id not in wanted:
                continue
            shutil.copyfile(case.image, args.out / "images" / f"{case.image_id}.png")
            _, mask = read_case(case)
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / "masks" / f"mask_{case.image_id}.png")
            writer.writerow([case.image_id, case.label.upper(), group_of.get(case.image_id, ""), "BUSI"])
            count += 1
    print(f"{count} images in {args.out}")


if __name__ == "__main__":
    main()
