"""Two models on the same images: the paired difference of every paired metric, from their per-image tables.

    PYTHONPATH=src python bench/paired.py NEW_per_image.csv OLD_per_image.csv [--resamples 2000]

e.g. the default model against an earlier one: `git show REV:metrics/plots/per_image.csv > old.csv`, then
`bench/paired.py metrics/plots/per_image.csv old.csv`. Prints, per paired metric of busi.evaluation.metrics.METRICS,
new and old with their 95% intervals, and new - old with its 95% paired-bootstrap interval and p (the same draw
of scans for both models: the new table's `group` column; `--splits data/splits.csv` names them for tables written
before it existed).
"""

import argparse

import pandas as pd

from busi.evaluation.metrics import bootstrap_ci, keys, paired_bootstrap, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new")
    parser.add_argument("old")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", help="data/splits.csv: draw its scans (copy groups), whatever the tables say")
    args = parser.parse_args()
    new, old = (pd.read_csv(path, dtype={"image_id": str, "group": str}) for path in (args.new, args.old))
    if args.splits:
        group_of = pd.read_csv(args.splits, dtype=str).set_index("image_id")["group"]
        new["group"] = new["image_id"].map(group_of).fillna(new["image_id"])
    drawn = "scans" if "group" in new and new["group"].nunique() < len(new) else "images"
    old = old.drop(columns="group", errors="ignore").merge(new[["image_id", "group"]], on="image_id", how="left") \
        if "group" in new else old
    comparison = paired_bootstrap(new, old, args.resamples, args.seed)
    intervals = [bootstrap_ci(table, args.resamples, args.seed) for table in (new, old)]
    print(f"{len(new)} images, {args.resamples} paired resamples of {drawn}")
    print("| metric | new | old | new - old [95% CI] | p |\n|---|---|---|---|---|")
    for name in keys("paired"):
        c = comparison[name]
        beyond = " *" if c["low"] > 0 or c["high"] < 0 else ""
        shown = [f"{value(table, name):.3f}" + (f" [{ci[name]['low']:.3f}, {ci[name]['high']:.3f}]" if name in ci
                                                else "") for table, ci in zip((new, old), intervals, strict=True)]
        print(f"| {name} | {shown[0]} | {shown[1]} | "
              f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{beyond} | {c['p']:.3f} |")


if __name__ == "__main__":
    main()
