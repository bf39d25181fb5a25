"""The real `dvc repro` of the data stages, in a temporary git repository, on a synthetic archive."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, set_param, sh
from synthetic import zip_folder

pytestmark = pytest.mark.slow


def run_names(repo):
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return sorted(run.info.run_name for run in client.search_runs(client.search_experiments()[0].experiment_id)) \
        if (repo / "mlflow.db").exists() else []


def test_dvc_repro_builds_caches_and_reruns_only_what_changed(dvc_repo):
    repo, env = dvc_repo
    out = sh("dvc", "repro", cwd=repo, env=env)
    for stage in ["source", "fetch", "merge_masks", "split", "preprocess", "train", "evaluate"]:
        assert f"Running stage '{stage}'" in out
    train = np.load(repo / "data/processed/train.npz")
    assert train["images"].shape[1:] == (64, 64)
    assert "INFO" not in out and "Downloading artifacts" not in out  # no MLflow noise in the stage logs
    metrics = sh("dvc", "metrics", "show", cwd=repo, env={**env, "COLUMNS": "180"})
    # The headline of validation and test, one readable line each; the detail files are not tabulated.
    assert [line.split()[0] for line in metrics.splitlines()] == ["Path", "metrics/val.json", "metrics/test.json"]
    assert max(len(line) for line in metrics.splitlines()) <= 180 and "per_class" not in metrics
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo, env=env))["data"]
    assert sorted(plots) == sorted(["Loss per epoch", "IoU per epoch", "Validation Dice and accuracy",
                                    "metrics/plots/confusion.csv", "metrics/plots/per_image.csv",
                                    "reports/figures/figure1_loss_iou.png", "reports/figures/figure2_contours.png"])
    assert (repo / "models/best.pt").exists() and run_names(repo) == ["resnet18-scse"]
    assert "mlflow.db" not in sh("git", "status", "--porcelain", cwd=repo)  # git-ignored

    again = sh("dvc", "repro", cwd=repo, env=env)
    assert [line for line in again.splitlines() if "Running stage" in line] == ["Running stage 'source':"]
    assert "Stage 'fetch' didn't change" in again  # a second repro only takes the archive's fingerprint

    set_param(repo, "preprocess", "image_size", 96)
    changed = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage 'preprocess'" in changed and "Running stage 'train'" in changed
    assert all(f"Running stage '{s}'" not in changed for s in ["fetch", "merge_masks", "split"])
    assert (repo / "predictor/predictor.json").is_file()  # the model predict and serving use
    assert np.load(repo / "data/processed/train.npz")["images"].shape[1:] == (96, 96)

    # A mistyped parameter: one line naming it, and the last training's and evaluation's outputs survive (DVC
    # deletes a stage's non-persistent outputs before running it), so nothing is retrained from epoch 1.
    kept = {name: (repo / name).read_bytes() for name in ["metrics/train.json", "metrics/train_history.csv",
                                                          "metrics/test.json", "metrics/plots/per_image.csv"]}
    set_param(repo, "train", "lr", "abc")
    failed = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "error: params.yaml: train.lr: " in failed.stdout + failed.stderr
    assert "Running stage 'train'" not in failed.stdout  # stopped by the source stage, before any other
    assert {name: (repo / name).read_bytes() for name in kept} == kept
    set_param(repo, "train", "lr", 0.001)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "trian": {"epochs": 3}}, sort_keys=False))
    failed = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "error: params.yaml: trian: " in failed.stdout + failed.stderr  # read by none
    assert {name: (repo / name).read_bytes() for name in kept} == kept
    assert (repo / "models/last.pt").is_file() and run_names(repo) == ["resnet18-scse", "resnet18-scse"]


def test_dvc_experiments_run_train_only_and_land_in_the_root_store(dvc_repo):
    repo, env = dvc_repo
    sh("dvc", "repro", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline", cwd=repo)

    out = sh("dvc", "exp", "run", "-n", "plain", "-S", "model.attention=null", cwd=repo, env=env)
    assert "Running stage 'train'" in out
    assert all(f"Running stage '{s}'" not in out for s in ["fetch", "merge_masks", "split", "preprocess"])
    assert "Running stage 'evaluate'" in out

    # Queued experiments run in temporary copies of the repository: their runs still land in its mlflow.db.
    sh("dvc", "exp", "run", "--queue", "-n", "queued", "-S", "train.lr=0.002", cwd=repo, env=env)
    sh("dvc", "exp", "run", "--run-all", cwd=repo, env=env)
    # (the workspace still holds the first experiment, attention=null, when the second is queued)
    assert run_names(repo) == ["resnet18-plain-plain", "resnet18-plain-queued", "resnet18-scse"]
    assert {"plain", "queued"} <= set(sh("dvc", "exp", "list", "--name-only", cwd=repo, env=env).split())

    # The README's recipe for comparing experiments fits a 180-column terminal, nothing cut ("…").
    recipe = next(line for line in (REPO / "README.md").read_text().splitlines()
                  if line.startswith("dvc exp show --no-pager --only-changed"))
    table = sh(*shlex.split(recipe.split("  #")[0]), cwd=repo, env={**env, "COLUMNS": "180"})
    assert max(len(line) for line in table.splitlines()) <= 180 and "…" not in table
    header = table.splitlines()[1].split()
    assert header[:1] == ["Experiment"] and {"model.attention", "train.lr"} <= set(header)  # what differs
    # and of the metrics only validation and test Dice and weighted F1, where they differ (--only-changed drops
    # a metric these tiny trainings leave equal across experiments)
    kept = {f"metrics/{split}.json:{key}" for split in ("val", "test") for key in ("dice", "f1_weighted")}
    assert set(header[1:]) - {"model.attention", "train.lr"} <= kept
    assert "[plain]" in table and "[queued]" in table


def snapshot(repo) -> dict:
    """Every file of the data stages' outputs, by content, and their dvc.lock entries (the source stage records
    whatever archive it last saw: it is not an output of the data)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {p.relative_to(repo).as_posix(): p.read_bytes() for folder in ("data/raw", "data/masks", "data/processed")
            for p in sorted((repo / folder).rglob("*")) if p.is_file()} | {
        "data/splits.csv": (repo / "data/splits.csv").read_bytes(),
        "dvc.lock": {name: entry for name, entry in lock.items() if name != "source"}}


def test_the_archive_content_is_pipeline_state_and_a_rejected_archive_loses_nothing(dvc_repo, busi_folder,
                                                                                     busi_zip, tmp_path):
    repo, env = dvc_repo
    first = sh("dvc", "repro", "preprocess", cwd=repo, env=env)
    assert "Running stage 'source'" in first and "Running stage 'fetch'" in first

    # The same content under another path: only the fingerprint is taken, nothing re-runs.
    shutil.copy(busi_zip, tmp_path / "copy.zip")
    same = sh("dvc", "repro", "preprocess", cwd=repo, env={**env, "BUSI_ARCHIVE": str(tmp_path / "copy.zip")})
    assert "Running stage 'source'" in same and "Running stage 'fetch'" not in same

    # Another archive: plain `dvc repro` re-runs fetch (no -f needed) and what depends on it.
    image = busi_folder / "benign/benign (4).png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    (tmp_path / "changed").mkdir()
    changed_zip = zip_folder(busi_folder, tmp_path / "changed" / "Dataset_BUSI_with_GT.zip")
    changed = sh("dvc", "repro", "preprocess", cwd=repo, env={**env, "BUSI_ARCHIVE": str(changed_zip)})
    assert "Running stage 'fetch'" in changed and "Running stage 'preprocess'" in changed
    good = snapshot(repo)

    # A rejected archive (a mask of another size than its image): one line naming the member, and the previous
    # data/raw and everything after it intact, dvc.lock too.
    mask = busi_folder / "malignant/malignant (3)_mask.png"
    Image.open(mask).resize((40, 30)).save(mask)
    (tmp_path / "bad").mkdir()
    bad_zip = zip_folder(busi_folder, tmp_path / "bad" / "Dataset_BUSI_with_GT.zip")
    result = subprocess.run(["dvc", "repro", "preprocess"], cwd=repo, capture_output=True, text=True,
                            env={**env, "BUSI_ARCHIVE": str(bad_zip)})
    assert result.returncode != 0
    assert (f"error: {bad_zip}: Dataset_BUSI_with_GT/malignant/malignant (3)_mask.png: mask is 40x30, its image is"
            in result.stderr + result.stdout)
    assert snapshot(repo) == good
    assert not [p for p in (repo / "data").iterdir() if p.name.startswith(".")]  # no temporary left behind

    # Back to the good archive: up to date, nothing re-runs but the fingerprint.
    back = sh("dvc", "repro", "preprocess", cwd=repo, env={**env, "BUSI_ARCHIVE": str(changed_zip)})
    assert "Running stage 'fetch'" not in back and snapshot(repo) == good


def test_two_queued_experiments_run_at_once_on_a_fresh_store(dvc_repo):
    """`dvc queue start -j 2` on a repository without mlflow.db: both workers open the store at once, and both
    experiments succeed (the store is created under a lock)."""
    repo, env = dvc_repo
    env = {**env, "OMP_NUM_THREADS": "1"}  # each worker takes its share of the cores
    sh("dvc", "repro", "preprocess", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data", cwd=repo)
    assert not (repo / "mlflow.db").exists()
    for name, lr in (("one", "0.002"), ("two", "0.003")):
        sh("dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", cwd=repo, env=env)
    # The workers are daemons that inherit the starter's output: not a pipe, or waiting for it would wait for them
    # (and a worker can hang after its task: DVC's monitor may shut down while the task still runs).
    with (repo / "queue_start.log").open("w") as log:
        started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=log, stderr=log)
    assert started.returncode == 0, (repo / "queue_start.log").read_text()
    deadline = time.monotonic() + 600
    while True:
        status = sh("dvc", "queue", "status", cwd=repo, env=env)
        if "Running" not in status and "Queued" not in status or time.monotonic() > deadline:
            break
        time.sleep(3)
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
    assert status.count("Success") == 2 and "Failed" not in status, status
    assert run_names(repo) == ["resnet18-scse-one", "resnet18-scse-two"]


def test_cross_validation_is_its_own_pipeline(dvc_repo):
    """`dvc repro cv/dvc.yaml` prepares the data and cross-validates; the default `dvc repro` never does."""
    repo, env = dvc_repo
    shutil.copytree(REPO / "cv", repo / "cv", ignore=shutil.ignore_patterns("results"))
    out = sh("dvc", "repro", "cv/dvc.yaml", cwd=repo, env=env)
    assert "Running stage 'cv/dvc.yaml:cross_validate'" in out and "Running stage 'train'" not in out
    assert (repo / "cv/results/predictor/predictor.json").is_file()
    assert len(list((repo / "cv/results/predictor").glob("network-*.safetensors"))) == 2  # split.folds: 2
    again = sh("dvc", "repro", "cv/dvc.yaml", cwd=repo, env=env)
    assert "cross_validate" not in "".join(line for line in again.splitlines() if "Running stage" in line)
    default = sh("dvc", "stage", "list", cwd=repo, env=env)  # what a plain `dvc repro` reproduces
    assert "cross_validate" not in default and "train" in default


def test_a_killed_dvc_exp_run_resumes_its_training_and_its_mlflow_run(dvc_repo):
    """`dvc exp run`, killed during training (SIGKILL to DVC and the training: nothing can close the run), then run
    again: DVC checks out the baseline's models/ first, yet training resumes from its last epoch into the same
    MLflow run, which ends FINISHED; no second run is made."""
    repo, env = dvc_repo
    sh("dvc", "repro", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline", cwd=repo)
    command = ["dvc", "exp", "run", "-S", "train.epochs=40", "-S", "train.patience=40"]
    with (repo / "exp.log").open("w") as log:
        process = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        lines = (repo / "exp.log").read_text().splitlines()
        if any(line.startswith("epoch 3/40") for line in lines):
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    process.wait()
    assert process.returncode == -signal.SIGKILL, (repo / "exp.log").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    killed = [run for run in client.search_runs(client.search_experiments()[0].experiment_id)
              if run.data.params.get("train.epochs") == "40"]
    assert [run.info.status for run in killed] == ["RUNNING"]

    again = sh(*command, cwd=repo, env=env)
    assert "resuming from epoch " in again and f"of 40 ({repo}/.resume/" in again, again  # models/ was replaced
    runs = [run for run in client.search_runs(client.search_experiments()[0].experiment_id)
            if run.data.params.get("train.epochs") == "40"]
    assert [(run.info.run_id, run.info.status) for run in runs] == [(killed[0].info.run_id, "FINISHED")]
    assert not list((repo / ".resume").glob("*.pt"))


def test_the_suite_passes_after_a_dvc_exp_run_changed_the_workspace(dvc_repo):
    """`dvc exp run -S model.encoder=vgg19` rewrites the workspace's params.yaml; the tests read the committed one,
    so the suite run right after it (here a test that names the encoder in its run names) still passes."""
    repo, env = dvc_repo
    shutil.copytree(REPO / "tests", repo / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pytest.ini", repo / "pytest.ini")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the tests", cwd=repo)
    sh("dvc", "exp", "run", "-S", "model.encoder=vgg19", "-S", "train.max_train_images=8", cwd=repo, env=env)
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["encoder"] == "vgg19"  # the workspace

    test = "tests/test_cross_validate.py::test_every_fold_trains_and_the_ensemble_is_one_predictor"  # resnet18-…
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", test],
                          cwd=repo, env={**env, "PYTHONPATH": str(repo / "src")}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed" in done.stdout
