import json
import subprocess
import sys

import pytest

from busi import BusiError
from busi.commands.check_metrics import check_metrics
from busi.evaluation.metrics import METRICS
from conftest import PARAMS_FILE, run_env

TOLERANCES = {metric.key: metric.tolerance for metric in METRICS if metric.tolerance is not None}

BASELINE = {"dice": 0.70, "iou": 0.55, "pixel_accuracy": 0.96, "dice_per_image": 0.60, "f1_weighted": 0.74,
            "accuracy": 0.73, "per_class": {"malignant": {"dice": 0.7}}}


def write(path, metrics):
    path.write_text(json.dumps(metrics))
    return path


def check(tmp_path, new):
    """Run the CLI as CI does; returns (exit code, stdout, stderr)."""
    (tmp_path / "params.yaml").write_text((PARAMS_FILE).read_text())
    write(tmp_path / "baseline.json", BASELINE)
    new_path = new if not isinstance(new, dict) else write(tmp_path / "new.json", new)
    result = subprocess.run([sys.executable, "-m", "busi", "check-metrics", str(new_path), "--baseline",
                             str(tmp_path / "baseline.json")], cwd=tmp_path, env=run_env(),
                            capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("change", [0.0, 0.05])
def test_equal_or_better_metrics_pass(tmp_path, change):
    code, out, _ = check(tmp_path, {**BASELINE, **{k: BASELINE[k] + change for k in TOLERANCES}})
    assert code == 0
    assert "| dice | 0.7000 |" in out and "REGRESSED" not in out


def test_a_drop_beyond_tolerance_fails_and_names_the_metric(tmp_path):
    code, out, err = check(tmp_path, {**BASELINE, "dice": BASELINE["dice"] - TOLERANCES["dice"] - 0.01})
    assert code == 1
    assert "| dice | 0.7000 | 0.6600 | -0.0400 | 0.03 | REGRESSED |" in out
    assert err.strip() == "error: metrics regressed beyond tolerance: dice"


def test_a_drop_within_tolerance_passes(tmp_path):
    table, regressed = check_metrics(write(tmp_path / "new.json", {**BASELINE, "dice": 0.69}),
                                     write(tmp_path / "base.json", BASELINE))
    assert regressed == [] and "| dice | 0.7000 | 0.6900 | -0.0100 |" in table


def test_missing_metric_and_malformed_file_are_clear_errors(tmp_path):
    base = write(tmp_path / "base.json", BASELINE)
    with pytest.raises(BusiError, match=r"new.json: metric 'iou' missing"):
        check_metrics(write(tmp_path / "new.json", {k: v for k, v in BASELINE.items() if k != "iou"}), base)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BusiError, match=r"bad.json: not valid JSON"):
        check_metrics(tmp_path / "bad.json", base)
    code, _, err = check(tmp_path, tmp_path / "bad.json")
    assert code == 1 and err.count("\n") == 1 and "bad.json: not valid JSON" in err


def test_a_binary_file_or_a_folder_is_one_error(tmp_path):
    base = write(tmp_path / "base.json", BASELINE)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81\x89PNG")
    with pytest.raises(BusiError, match=r"binary.json: not a text file"):
        check_metrics(tmp_path / "binary.json", base)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BusiError, match=r"folder: cannot read"):
        check_metrics(tmp_path / "folder", base)
