"""Stage split: train/val/test, stratified by class, seeded and group-aware. Copies of one scan and
consecutive frames of one lesion (found by busi.data.copies), and the images of one patient or case where the
dataset names them (dataset.case_column), form a group that never straddles two splits; train+val also get k
group-aware folds."""

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from busi import CLASSES, SPLITS, BusiError
from busi.config import SplitParams
from busi.data.cases import read_cases
from busi.data.copies import copy_groups, find_copy_pairs
from busi.files import atomic_file


def split(raw_dir: Path, params: SplitParams, out_csv: Path, report_json: Path) -> dict:
    """Write splits.csv (image_id, label, split, group, fold) and the split report; returns the report."""
    cases = read_cases(raw_dir)
    label_of = {case.image_id: case.label for case in cases}
    pairs = find_copy_pairs({case.image_id: case.image for case in cases},
                            {case.image_id: case.masks for case in cases})
    # Copies filed under two classes are a conflict (the same lesion can't be both); a patient's lesions may be.
    copies = members_of(copy_groups(label_of, pairs))
    conflicts = {g: sorted(ids) for g, ids in sorted(copies.items()) if len({label_of[i] for i in ids}) > 1}
    dropped = {i for ids in conflicts.values() for i in ids} if params.conflicts == "drop" else set()
    by_case = members_of({case.image_id: case.group for case in cases if case.group})
    case_links = [(ids[0], other) for ids in by_case.values() for other in ids[1:]]
    group_of = copy_groups(label_of, [(p.a, p.b) for p in pairs] + case_links)
    members = {g: [i for i in ids if i not in dropped] for g, ids in members_of(group_of).items()}
    members = {g: ids for g, ids in members.items() if ids}
    split_of = assign_groups(members, label_of, params)
    rows = sorted((i, label_of[i], split_of[g], g) for g, ids in members.items() for i in ids)
    fold_of = assign_folds([r for r in rows if r[2] != "test"], params)

    with atomic_file(out_csv) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "label", "split", "group", "fold"])
        writer.writerows((*row, fold_of.get(row[0], -1)) for row in rows)

    counts = {s: {label: 0 for label in CLASSES} for s in SPLITS}
    for _, label, s, _ in rows:
        counts[s][label] += 1
    sizes = Counter(group_of.values())
    report = {
        "images": len(cases),
        "images_in_splits": len(rows),
        "copy_pairs": sum(pair.kind == "copy" for pair in pairs),
        "frame_pairs": sum(pair.kind == "frame" for pair in pairs),
        "groups": len(sizes),
        "groups_with_copies": sum(size > 1 for size in sizes.values()),
        "images_in_copy_groups": sum(size for size in sizes.values() if size > 1),
        "largest_group": max(sizes.values()),
        "cases_of_several_images": sum(len(ids) > 1 for ids in by_case.values()),  # dataset.case_column
        "counts": {s: {**c, "total": sum(c.values())} for s, c in counts.items()},
        "conflicts": {
            "handling": params.conflicts,
            "groups": len(conflicts),
            "images": sum(len(ids) for ids in conflicts.values()),
            "members": conflicts,
        },
    }
    with atomic_file(report_json) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def members_of(group_of: dict[str, str]) -> dict[str, list[str]]:
    """{group: [ids]} from {id: group}."""
    members = defaultdict(list)
    for image_id, group in group_of.items():
        members[group].append(image_id)
    return dict(members)


def assign_groups(members: dict[str, list[str]], label_of: dict[str, str], params: SplitParams) -> dict:
    """Greedy stratified assignment of whole groups: largest groups first (seeded order among equals),
    each to the split whose class quota is least filled."""
    fractions = params.fractions.model_dump()
    groups = sorted(members)
    order = np.random.default_rng(params.seed).permutation(len(groups))
    groups = sorted((groups[i] for i in order), key=lambda g: -len(members[g]))  # stable: keeps the shuffle
    group_label = {g: Counter(label_of[i] for i in members[g]).most_common(1)[0][0] for g in groups}
    class_size = Counter(group_label[g] for g in groups for _ in members[g])
    filled = defaultdict(float)
    split_of = {}
    for g in groups:
        label = group_label[g]
        open_splits = [s for s in SPLITS if fractions[s] > 0]
        best = max(open_splits, key=lambda s: 1 - filled[label, s] / (fractions[s] * class_size[label]))
        split_of[g] = best
        filled[label, best] += len(members[g])
    return split_of


def assign_folds(rows: list[tuple], params: SplitParams) -> dict[str, int]:
    """k group-aware, class-stratified folds over train+val (for cross-validation)."""
    ids, labels, _, groups = zip(*rows, strict=True) if rows else ((), (), (), ())
    folds = StratifiedGroupKFold(n_splits=params.folds, shuffle=True, random_state=params.seed)
    try:
        pieces = list(folds.split(np.zeros(len(ids)), labels, groups))
    except ValueError as err:
        raise BusiError(f"params.yaml: split.folds: {err}") from None
    return {ids[i]: fold for fold, (_, held_out) in enumerate(pieces) for i in held_out}


def run(args, params) -> str:
    report = split(args.raw, params.split, args.out, args.report)
    totals = ", ".join(f"{s} {c['total']}" for s, c in report["counts"].items())
    return (f"{totals}; {report['groups_with_copies']} groups of several images (copies, frames, cases), "
            f"{report['conflicts']['groups']} conflicts ({params.split.conflicts})")
