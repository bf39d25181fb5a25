"""The metrics gate: compare a new metrics/test.json with a committed baseline and fail on a regression.

Every gated metric is higher-is-better; a drop larger than its tolerance (absolute) fails the check.
The gated metrics and their tolerances are those of busi.evaluation.metrics.METRICS with a tolerance.
"""

import json
from pathlib import Path

from busi import BusiError
from busi.evaluation.metrics import METRICS, lookup


def read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BusiError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise BusiError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise BusiError(f"{path}: not a text file (expected a JSON object of metrics)") from None
    except OSError as err:
        raise BusiError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(metrics, dict):
        raise BusiError(f"{path}: expected a JSON object of metrics")
    return metrics


def number(metrics: dict, key: str, path: Path) -> float:
    value = lookup(metrics, key)
    if value is None:
        raise BusiError(f"{path}: metric {key!r} missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BusiError(f"{path}: metric {key!r} is not a number (got {value!r})")
    return float(value)


def check_metrics(new_path: Path, baseline_path: Path) -> tuple[str, list[str]]:
    """A markdown table (metric, baseline, new, change, tolerance, status) and the regressed metric names."""
    new, baseline = read_metrics(new_path), read_metrics(baseline_path)
    rows = ["| metric | baseline | new | change | tolerance | status |", "|---|---|---|---|---|---|"]
    regressed = []
    for key, tolerance in ((m.key, m.tolerance) for m in METRICS if m.tolerance is not None):
        before, after = number(baseline, key, baseline_path), number(new, key, new_path)
        change = after - before
        ok = change >= -tolerance
        if not ok:
            regressed.append(key)
        rows.append(f"| {key} | {before:.4f} | {after:.4f} | {change:+.4f} | {tolerance:.2f} | "
                    f"{'ok' if ok else 'REGRESSED'} |")
    return "\n".join(rows), regressed


def run(args, params) -> str:
    table, regressed = check_metrics(args.new, args.baseline)
    print(table)
    if regressed:
        raise BusiError(f"metrics regressed beyond tolerance: {', '.join(regressed)}")
    return "no gated metric regressed"
