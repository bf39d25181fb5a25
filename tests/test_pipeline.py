"""The real `dvc repro` of the data stages, in a temporary git repository, on a synthetic archive."""

import shutil
import subprocess

import numpy as np
import pytest
import yaml

from conftest import REPO, run_env

pytestmark = pytest.mark.slow


def sh(*args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def set_param(repo, section, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def dvc_repo(tmp_path, busi_zip):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "metrics").mkdir()
    set_param(repo, "split", "folds", 2)  # the synthetic archive is small
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    return repo, run_env(BUSI_ARCHIVE=str(busi_zip))


def test_dvc_repro_builds_caches_and_reruns_only_what_changed(dvc_repo):
    repo, env = dvc_repo
    out = sh("dvc", "repro", cwd=repo, env=env)
    for stage in ["fetch", "merge_masks", "split", "preprocess"]:
        assert f"Running stage '{stage}'" in out
    train = np.load(repo / "data/processed/train.npz")
    assert train["images"].shape[1:] == (224, 224)
    assert "split.json" in sh("dvc", "metrics", "show", cwd=repo, env=env)

    again = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage" not in again  # a second repro is a no-op

    set_param(repo, "preprocess", "image_size", 64)
    changed = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage 'preprocess'" in changed
    assert all(f"Running stage '{s}'" not in changed for s in ["fetch", "merge_masks", "split"])
    assert np.load(repo / "data/processed/train.npz")["images"].shape[1:] == (64, 64)
