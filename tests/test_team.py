"""A team's set-up, really run: one MLflow tracking server on PostgreSQL with proxied artifacts, the pipeline
run against it, and data and models shared through a DVC remote (docs/team.md)."""

import sys

import mlflow
import pytest

from conftest import sh

pytestmark = pytest.mark.slow


def test_the_pipeline_on_a_team_server_and_a_clone_from_the_dvc_remote(dvc_repo, tracking_server, tmp_path):
    """`dvc repro` logs into the PostgreSQL-backed server (no mlflow.db appears), its model's files go through
    the server to the artifact folder; `busi report` and `busi predict models:/...` read the server; `dvc push`
    to a remote, then a fresh clone's `dvc pull` gives the same outputs with nothing to re-run."""
    repo, env = dvc_repo
    url, postgres, artifacts = tracking_server
    env = {**env, "MLFLOW_TRACKING_URI": url}
    sh("dvc", "repro", cwd=repo, env=env)
    assert not (repo / "mlflow.db").exists()

    store = mlflow.MlflowClient(postgres)  # the server's own database, read directly
    (run,) = store.search_runs([store.get_experiment_by_name("busi").experiment_id])
    assert run.info.status == "FINISHED" and "test/dice" in run.data.metrics
    (model,) = store.search_logged_models([run.info.experiment_id])
    assert any(artifacts.rglob("predictor.json"))  # uploaded through the server, not written by the client
    report = sh(sys.executable, "-m", "busi", "report", "--out", str(tmp_path / "runs.md"), cwd=repo, env=env)
    assert "wrote" in report and run.info.run_id[:8] in (tmp_path / "runs.md").read_text()
    scan = min(path for path in (repo / "data/raw").rglob("*.png") if "_mask" not in path.name)
    sh(sys.executable, "-m", "busi", "predict", str(scan), "--model", f"models:/{model.model_id}",
       "--out", str(tmp_path / "predicted"), cwd=repo, env=env)
    assert (tmp_path / "predicted" / "predictions.jsonl").read_text().count("\n") == 1

    # The team's DVC remote (a folder here; SSH or S3 for a team, the same commands).
    sh("dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a run", cwd=repo)
    sh("dvc", "push", cwd=repo, env=env)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone, env=env)
    for path in ["data/processed/test.npz", "models/best.pt", "predictor/predictor.json"]:
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    # `source` always re-reads the archive's fingerprint (it is how a new download is noticed); nothing else runs.
    status = sh("dvc", "status", cwd=clone, env=env)
    assert status.split() == ["source:", "always", "changed"], status
    again = sh("dvc", "repro", cwd=clone, env=env)
    assert "Running stage 'source'" in again and again.count("Running stage") == 1, again
