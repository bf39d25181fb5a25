import subprocess
import sys

import pytest
import yaml

from busi import BusiError
from busi.cli import check_tables
from busi.config import load_params
from conftest import PARAMS_FILE, run_env


def write_params(path, change):
    params = yaml.safe_load((PARAMS_FILE).read_text())
    change(params)
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_are_valid():
    params = load_params(PARAMS_FILE)
    check_tables(PARAMS_FILE, params)
    assert params.preprocess.image_size % 32 == 0
    assert params.split.fractions.train + params.split.fractions.val + params.split.fractions.test == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["split"].update(seeed=1), "split.seeed: Extra inputs are not permitted"),
        (lambda p: p["split"].update(seed="42"), "split.seed: Input should be a valid integer"),
        (lambda p: p["split"]["fractions"].update(train=0.8),
         "split.fractions: train + val + test must sum to 1, got 1.1"),
        (lambda p: p["preprocess"].update(image_size=200), "preprocess.image_size: must be divisible by 32"),
        (lambda p: p["split"].update(conflicts="merge"), "split.conflicts: Input should be 'drop' or 'keep'"),
        (lambda p: p.pop("preprocess"), "preprocess: Field required"),
        (lambda p: p.update(trian={}), "trian: Extra inputs are not permitted"),
        (lambda p: p["train"].update(ema=1.0), "train.ema: Input should be less than 1"),
        (lambda p: p["train"].update(monitor="last", scheduler="plateau"),
         "train: monitor: last watches no validation metric, which scheduler: plateau needs"),
        (lambda p: p["evaluate"]["postprocessing"].update(flip_tta="yes"),
         "evaluate.postprocessing.flip_tta: 'yes' is not auto, on, off"),
        (lambda p: p["evaluate"]["postprocessing"].update(min_lesion_area=1.5),
         "evaluate.postprocessing.min_lesion_area: 1.5 is not auto, on, off or a number from 0 to 1"),
        (lambda p: p["evaluate"]["postprocessing"].update(fill_holes="on"),
         "evaluate.postprocessing.fill_holes: unknown step"),
    ],
)
def test_invalid_params_name_the_parameter(tmp_path, change, message):
    path = write_params(tmp_path / "params.yaml", change)
    with pytest.raises(BusiError, match=message.replace("+", r"\+")):
        check_tables(path, load_params(path))


def test_cli_refuses_invalid_params_before_any_work(tmp_path):
    write_params(tmp_path / "params.yaml", lambda p: p["preprocess"].update(image_size=100))
    result = subprocess.run([sys.executable, "-m", "busi", "preprocess"], cwd=tmp_path, env=run_env(),
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: preprocess.image_size: must be divisible by 32 (the U-Net halves it five times) "
        "(got 100)"
    ]
    assert not (tmp_path / "data").exists()


def test_malformed_yaml_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("split: [unclosed\n")
    with pytest.raises(BusiError, match=r"params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_a_binary_params_file_or_a_folder_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x81")
    with pytest.raises(BusiError, match=r"params.yaml: not a text file \(expected YAML\)"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BusiError, match=r"folder: a folder, not a params file"):
        load_params(tmp_path / "folder")
