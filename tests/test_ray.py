"""The comparison grid on a real 2-node Ray cluster (two `ray start` on loopback), logging to a real MLflow server
on PostgreSQL; a worker killed during a fold; the report the same as the single-machine path's (docs/team.md)."""

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import free_port, run_env, sh, tiny_params

pytestmark = pytest.mark.slow
EPOCHS = 8


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node and a second node, one CPU each, on this machine: the environment that reaches the cluster
    (RAY_ADDRESS, and the token every node and driver shares: Ray's token authentication, on by default)."""
    pytest.importorskip("ray")
    port = free_port()
    access = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = run_env(RAY_USAGE_STATS_ENABLED="0", **{k: v for k, v in access.items() if k != "RAY_ADDRESS"})
    ray = [str(Path(sys.executable).with_name("ray"))]  # the CLI installed beside this Python
    try:
        sh(*ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
           "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", cwd=tmp_path, env=env, timeout=180)
        sh(*ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
           "--num-gpus=0", cwd=tmp_path, env=env, timeout=180)
        yield access
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=180)


def children(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def parents(client):
    experiment = client.get_experiment_by_name("busi").experiment_id
    return sorted((run for run in client.search_runs([experiment]) if "mlflow.parentRunId" not in run.data.tags
                   and "busi.report" not in run.data.tags), key=lambda run: run.info.run_name)


def grid_command(processed, raw, tmp_path, out):
    params = tiny_params(epochs=EPOCHS, patience=EPOCHS)
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"bootstrap": 20})})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    (tmp_path / "grid.yaml").write_text("default: {}\nfaster: {train.lr: 0.002}\n")
    return [sys.executable, "-m", "busi", "cross-validate", "--params", str(tmp_path / "params.yaml"),
            "--grid", str(tmp_path / "grid.yaml"), "--data", str(processed), "--splits",
            str(processed.parent / "splits.csv"), "--raw", str(raw), "--masks", str(processed.parent / "masks"),
            "--out", str(out)]


def cv_rows(report_md):
    """The cross-validation table's rows, without what differs between two runs of one grid: run ids, minutes."""
    section = report_md.read_text().split("## Cross-validated configurations")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in rows[0]]
    minutes = header.index("minutes")
    return [[re.sub(r" \(`\w+`\)", "", cell.strip()) for i, cell in enumerate(row) if i != minutes]
            for row in rows]


def test_the_grid_on_a_two_node_ray_cluster_survives_a_killed_worker(ray_cluster, tracking_server, processed,
                                                                      synthetic_source, tmp_path):
    url, _, _ = tracking_server
    command = grid_command(processed, synthetic_source, tmp_path, tmp_path / "on_ray")
    env = run_env(**ray_cluster, MLFLOW_TRACKING_URI=url, OMP_NUM_THREADS="1")
    log = tmp_path / "grid.log"
    with log.open("w") as out:
        grid = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)

    # Kill the worker process of the first fold that has finished two epochs: Ray retries its task.
    client = mlflow.MlflowClient(url)
    killed, deadline = None, time.monotonic() + 900
    while killed is None and grid.poll() is None and time.monotonic() < deadline:
        for parent in parents(client) if client.get_experiment_by_name("busi") else []:
            for run in children(client, parent.info.run_id):
                epochs = len(client.get_metric_history(run.info.run_id, "train/loss"))
                if 2 <= epochs < EPOCHS and run.info.status == "RUNNING" and "busi.pid" in run.data.tags:
                    os.kill(int(run.data.tags["busi.pid"]), signal.SIGKILL)
                    killed = run
                    break
            if killed:
                break
        time.sleep(0.5)
    assert grid.wait(timeout=900) == 0, log.read_text()[-5000:]
    assert killed is not None, "no fold was seen mid-training"

    # 2 configurations x 2 folds: 2 parent runs of 2 child runs each, all finished, on both nodes.
    found = parents(client)
    assert [run.info.run_name for run in found] == ["resnet18-scse-cv2-default", "resnet18-scse-cv2-faster"]
    folds = [child for parent in found for child in children(client, parent.info.run_id)]
    assert len(folds) == 4 and all(run.info.status == "FINISHED" for run in folds)
    assert all(parent.info.status == "FINISHED" for parent in found)
    assert len({run.data.tags["busi.ray_node"] for run in folds}) == 2  # both nodes trained
    # The killed fold went on in its own run (retried on the node that kept its checkpoint, or started over).
    retried = client.get_run(killed.info.run_id)
    assert retried.data.tags["busi.pid"] != killed.data.tags["busi.pid"]
    assert sorted({m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")}) == list(
        range(1, EPOCHS + 1))
    on_ray = tmp_path / "on_ray.md"
    sh(sys.executable, "-m", "busi", "report", "--out", str(on_ray), cwd=tmp_path, env=env)

    # The single-machine path, same grid and seeds, its own sqlite store: the same table.
    local_env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", OMP_NUM_THREADS="1")
    sh(*grid_command(processed, synthetic_source, tmp_path, tmp_path / "here"), cwd=tmp_path, env=local_env)
    here = tmp_path / "here.md"
    sh(sys.executable, "-m", "busi", "report", "--out", str(here), cwd=tmp_path, env=local_env)
    assert cv_rows(on_ray) == cv_rows(here)
    assert (tmp_path / "on_ray/default/predictor/predictor.json").is_file()
