"""Datasets beyond BUSI: the folders layout (images, masks by a name rule, a labels CSV), fetched, split by case and
scored as an external dataset by evaluate-external (the CLI, MLflow, and `dvc repro` with the dataset in params)."""

import csv
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from busi import BusiError
from busi.cli import main
from busi.config import DatasetParams, load_params
from busi.data.cases import find_root, read_case, scan
from busi.evaluation.metrics import malignant_vs_benign
from busi.model.postprocessing import PostProcessing
from busi.model.predictor import Predictor
from busi.stages.fetch import fetch
from busi.stages.split import split
from conftest import PARAMS_FILE, project_copy, run_env, untrained_network
from synthetic import FOLDERS_DATASET, make_folders, zip_folder

DATASET = DatasetParams(**FOLDERS_DATASET)


@pytest.fixture
def folders(tmp_path) -> Path:
    """Six benign, six malignant and four normal images, two per patient, in the folders layout."""
    return make_folders(tmp_path / "source", {"benign": 6, "malignant": 6, "normal": 4})


def test_the_folders_layout_pairs_images_masks_and_labels_by_the_rules(folders):
    cases = scan(find_root(folders.parent, DATASET), DATASET)  # found one folder below, as in an archive
    assert len(cases) == 16
    by_id = {case.image_id: case for case in cases}
    assert by_id["ben000"].label == "benign" and by_id["ben000"].group == "Pb00" == by_id["ben001"].group
    assert by_id["mal003"].masks == (folders / "masks" / "mask_mal003.png",)
    assert by_id["nor000"].masks == ()  # a normal image without a mask file: no lesion
    image, mask = read_case(by_id["ben000"])
    assert image.dtype == np.uint8 and mask.shape == image.shape and mask.any()
    assert not read_case(by_id["nor000"])[1].any()


def edit_labels(folders: Path, change) -> None:
    rows = list(csv.reader((folders / "labels.csv").open()))
    change(rows)
    with (folders / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda rows: rows.__setitem__(0, ["name", *rows[0][1:]]), "labels.csv: no column 'image' (params: "
                                                              "dataset.id_column; the CSV has 'name', "),
    (lambda rows: rows[3].__setitem__(1, "suspicious"), "labels.csv: line 4: label 'suspicious' is not one of "
                                                        "benign, malignant, normal"),
    (lambda rows: rows[5].__setitem__(0, "ben000"), "labels.csv: line 6: id 'ben000' already on line 2"),
    (lambda rows: rows[2].__setitem__(0, "../ben001"), "labels.csv: line 3: id '../ben001' is not a plain file "
                                                       "name part"),
    (lambda rows: rows.pop(2), "images/ben001.png: not in labels.csv (every image and mask needs its label row)"),
    (lambda rows: rows.append(["ben999", "benign", "P9"]), "labels.csv: line 18: no image images/ben999.png for "
                                                           "id 'ben999'"),
])
def test_a_bad_labels_csv_is_one_line_naming_the_file_and_line(folders, change, expected):
    edit_labels(folders, change)
    with pytest.raises(BusiError, match=None) as err:
        scan(folders, DATASET)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_lesion_image_without_its_mask_and_a_mask_of_another_size_are_refused(folders):
    (folders / "masks" / "mask_mal002.png").unlink()
    with pytest.raises(BusiError, match=r"images/mal002.png: no mask masks/mask_mal002.png \(only a normal"):
        scan(folders, DATASET)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(folders / "masks" / "mask_mal002.png")
    case = next(c for c in scan(folders, DATASET) if c.image_id == "mal002")
    with pytest.raises(BusiError, match=r"mask_mal002.png: mask is 12x10, its image is \d+x\d+"):
        read_case(case)


def test_fetch_indexes_a_zipped_dataset_and_split_keeps_each_patient_in_one_split(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("BUSI_ARCHIVE", str(zip_folder(folders, tmp_path / "mydata.zip")))
    assert fetch(tmp_path / "raw", DATASET) == 16
    index = pd.read_csv(tmp_path / "raw" / "cases.csv", keep_default_na=False)
    assert list(index.columns) == ["image_id", "label", "group", "image", "masks"]
    assert (tmp_path / "raw" / index.loc[0, "image"]).is_file() and index["group"].str.startswith("P").all()

    params = load_params(PARAMS_FILE).split.model_copy(update={"folds": 2})
    report = split(tmp_path / "raw", params, tmp_path / "splits.csv", tmp_path / "split.json")
    assert report["cases_of_several_images"] == 8 and report["images_in_splits"] == 16
    rows = pd.read_csv(tmp_path / "splits.csv").merge(index[["image_id", "group"]], on="image_id",
                                                      suffixes=("", "_case"))
    splits_of_case = rows.groupby("group_case")["split"].nunique()
    assert (splits_of_case == 1).all() and len(splits_of_case) == 8  # no patient straddles two splits
    assert set(rows["split"]) == {"train", "val", "test"}
    folds_of_case = rows[rows["split"] != "test"].groupby("group_case")["fold"].nunique()
    assert (folds_of_case == 1).all()  # nor two cross-validation folds


def test_fetch_refuses_a_folders_dataset_without_an_archive(tmp_path, monkeypatch):
    monkeypatch.delenv("BUSI_ARCHIVE", raising=False)
    with pytest.raises(BusiError, match="dataset.layout is folders: set BUSI_ARCHIVE"):
        fetch(tmp_path / "raw", DATASET)


def test_malignant_vs_benign_by_hand():
    # score = p_malignant / (p_benign + p_malignant): benign 0.2, 0.6; malignant 0.4, 0.9. Of the four
    # (malignant, benign) pairs, three rank the malignant higher: AUC 0.75. The normal image does not count.
    cases = pd.DataFrame({
        "label": ["benign", "benign", "malignant", "malignant", "normal"],
        "predicted_label": ["benign", "malignant", "benign", "malignant", "malignant"],
        "p_benign": [0.8, 0.4, 0.6, 0.1, 0.1], "p_malignant": [0.2, 0.6, 0.4, 0.9, 0.9],
        "p_normal": [0.0, 0.0, 0.0, 0.0, 0.0]})
    found = malignant_vs_benign(cases)
    assert found["auc_malignant_vs_benign"] == pytest.approx(0.75)
    # predicted malignant: one of two benign (FP 1), one of two malignant (TP 1, FN 1): F1 = 2/(2+1+1) = 0.5
    assert found["f1_malignant_vs_benign"] == pytest.approx(0.5)
    assert malignant_vs_benign(cases[cases["label"] != "malignant"]) == {}


@pytest.fixture
def external_project(tmp_path, monkeypatch, store):
    """A project whose params name a zipped external dataset without normal images, and a predictor whose MLflow
    run holds BUSI test metrics."""
    external = make_folders(tmp_path / "ext", {"benign": 4, "malignant": 4}, seed=5, name="hospital_b")
    params = yaml.safe_load((PARAMS_FILE).read_text())
    params["external"] = {"hospital-b": {**FOLDERS_DATASET, "path": str(zip_folder(external, tmp_path / "hb.zip"))}}
    params["evaluate"]["bootstrap"] = 50
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    experiment = store.create_experiment("busi")
    run_id = store.create_run(experiment).info.run_id
    for name, value in {"test/dice": 0.7, "test/dice_per_image": 0.65, "test/auc_malignant_vs_benign": 0.9}.items():
        store.log_metric(run_id, name, value)
    store.set_terminated(run_id)
    network, config = untrained_network()
    Predictor([network], [config], PostProcessing(), {"mlflow_run_id": run_id}).save(tmp_path / "predictor")
    return tmp_path, run_id


@pytest.mark.usefixtures("one_thread")
def test_evaluate_external_writes_metrics_csv_figure_and_logs_them_beside_busi(external_project, store, capsys):
    project, run_id = external_project
    assert main(["evaluate-external", "hospital-b"]) == 0
    printed = capsys.readouterr().out
    assert "dice" in printed and "BUSI test" in printed

    headline = json.loads((project / "metrics/external/hospital-b.json").read_text())
    detail = json.loads((project / "metrics/external/hospital-b_detail.json").read_text())
    assert headline["images"] == 8 and {"dice", "dice_per_image", "iou", "f1_weighted"} <= headline.keys()
    assert "roc_auc_ovr" not in headline  # no normal images: the binary question instead
    assert set(detail["per_class"]) == {"benign", "malignant"}  # no normal entry whose F1 would read as 0
    assert 0 <= headline["auc_malignant_vs_benign"] <= 1 and "f1_malignant_vs_benign" in detail
    assert detail["busi_test"] == {"dice": 0.7, "dice_per_image": 0.65, "auc_malignant_vs_benign": 0.9}
    assert detail["difference"]["dice"] == pytest.approx(headline["dice"] - 0.7)
    assert detail["ci95"]["dice"]["low"] <= headline["dice"] <= detail["ci95"]["dice"]["high"]
    cases = pd.read_csv(project / "metrics/external/hospital-b_per_image.csv")
    assert len(cases) == 8 and cases["group"].nunique() == 4 and {"p_malignant", "dice"} <= set(cases.columns)
    assert (project / "reports/figures/external_hospital-b_cases.png").stat().st_size > 10_000

    run = store.get_run(run_id)
    assert run.data.metrics["external_hospital-b/dice"] == pytest.approx(headline["dice"])
    assert "external_hospital-b_ci95/dice_low" in run.data.metrics and run.info.status == "FINISHED"
    logged = {a.path for a in store.list_artifacts(run_id)}
    assert {"external_hospital-b_per_image.json", "external_hospital-b_cases.png"} <= logged

    # The study report puts it beside the BUSI test split.
    from busi.commands.report import report
    from test_report import table_rows

    rows = table_rows(report(project / "study.md").read_text(), "## External datasets")
    ci = detail["ci95"]["dice"]
    row = rows[0]
    assert len(rows) == 1 and row[0].endswith(f"(`{run_id[:8]}`)") and row[1:3] == ["hospital-b", "8"]
    assert row[3] == f"0.700 → {headline['dice']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
    assert row[5].startswith("0.900 → ")


def test_evaluate_external_errors_are_one_line(external_project, capsys):
    project, _ = external_project
    assert main(["evaluate-external", "hospital-c"]) == 1
    assert "external.hospital-c: not configured (configured: hospital-b)" in capsys.readouterr().err
    network, config = untrained_network()
    Predictor([network], [config], PostProcessing()).save(project / "bare")
    assert main(["evaluate-external", "hospital-b", "--model", "bare"]) == 1
    assert "bare: the model names no MLflow run" in capsys.readouterr().err
    Predictor([network], [config], PostProcessing(), {"mlflow_run_id": "0" * 32}).save(project / "elsewhere")
    assert main(["evaluate-external", "hospital-b", "--model", "elsewhere"]) == 1
    assert f"its MLflow run {'0' * 32} is not in the tracking store" in capsys.readouterr().err
    assert not (project / "metrics/external").exists()  # nothing half-written


def test_an_external_dataset_holding_images_the_model_saw_is_refused(external_project, monkeypatch, capsys):
    project, _ = external_project  # as if the model had been trained on the "external" dataset itself
    monkeypatch.setenv("BUSI_ARCHIVE", str(project / "ext" / "hospital_b"))
    fetch(project / "data/raw", DATASET)
    split(project / "data/raw", load_params(PARAMS_FILE).split.model_copy(update={"folds": 2}),
          project / "data/splits.csv", project / "split.json")
    assert main(["evaluate-external", "hospital-b"]) == 1
    err = capsys.readouterr().err
    assert f"error: {project / 'hb.zip'}: " in err and " images are byte-identical to images the model was trained " \
        "or selected on (e.g. " in err and err.count("\n") == 1
    assert not (project / "metrics/external").exists()


def folders_repo(tmp_path) -> tuple[Path, dict]:
    """A git + DVC repository of the project trained on a folders-layout dataset, with an external dataset."""
    repo = project_copy(tmp_path / "repo")
    source = make_folders(tmp_path / "source", {"benign": 6, "malignant": 6, "normal": 4})
    external = make_folders(tmp_path / "ext", {"benign": 3, "malignant": 3}, seed=9, name="hospital_b")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"] = FOLDERS_DATASET
    params["external"] = {"hospital-b": {**FOLDERS_DATASET, "path": str(external)}}
    params["split"]["folds"] = 2
    params["preprocess"]["image_size"] = 64
    params["train"].update(epochs=1, precision="fp32")
    params["evaluate"]["bootstrap"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=repo, check=True)
    return repo, run_env(BUSI_ARCHIVE=str(source))


@pytest.mark.slow
def test_dvc_repro_trains_on_a_folders_dataset_and_scores_the_external_one(tmp_path):
    repo, env = folders_repo(tmp_path)
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ["fetch", "split", "train", "evaluate", "evaluate_external@hospital-b"]:
        assert f"Running stage '{stage}'" in result.stdout

    cases = {row["image_id"]: row["group"] for row in csv.DictReader((repo / "data/raw/cases.csv").open())}
    splits_of = defaultdict(set)
    for row in csv.DictReader((repo / "data/splits.csv").open()):
        splits_of[cases[row["image_id"]]].add(row["split"])
    assert len(splits_of) == 8 and all(len(s) == 1 for s in splits_of.values())  # no case straddles two splits

    detail = json.loads((repo / "metrics/external/hospital-b_detail.json").read_text())
    test = json.loads((repo / "metrics/test.json").read_text())
    assert detail["images"] == 6 and detail["busi_test"]["dice"] == pytest.approx(test["dice"])
    run_id = json.loads((repo / "metrics/train.json").read_text())["run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db").get_run(run_id)
    assert run.data.metrics["external_hospital-b/dice"] == pytest.approx(detail["dice"])
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "metrics/external/hospital-b.json" in shown

    again = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "Stage 'evaluate_external@hospital-b' didn't change" in again


def test_patients_are_drawn_whole_in_the_bootstrap():
    """Twenty patients of two identical images each: drawn image by image, the interval pretends to forty
    independent measurements; drawn by patient it is about sqrt(2) wider, as twenty measurements are."""
    from busi.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    tp = np.repeat(rng.integers(0, 40, 20), 2)  # per patient, the same counts for both images
    cases = pd.DataFrame({"label": "benign", "predicted_label": "benign", "tp": tp, "fp": 40 - tp, "fn": 40 - tp,
                          "tn": 1000, "p_benign": 1.0, "p_malignant": 0.0, "p_normal": 0.0})
    cases["dice"] = 2 * tp / (2 * tp + 2 * (40 - tp))
    cases["iou"] = tp / (tp + 2 * (40 - tp))
    cases["lesion_area_px"], cases["predicted_area_px"] = 40, 40
    by_patient = cases.assign(group=np.repeat([f"P{i}" for i in range(20)], 2))
    width = {name: ci["dice_per_image"]["high"] - ci["dice_per_image"]["low"] for name, ci in
             {"images": bootstrap_ci(cases, 400, 0), "patients": bootstrap_ci(by_patient, 400, 0)}.items()}
    assert 1.2 < width["patients"] / width["images"] < 1.7
