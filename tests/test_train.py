"""Training on synthetic data: the loss falls, a killed run resumes, checkpoints load safely."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from busi.model.checkpoint import load_checkpoint
from busi.training import is_better, progress_line, train
from conftest import SIZE, run_env, tiny_params


def test_loss_falls_when_overfitting_a_handful_of_images(processed, tmp_path, store):
    params = tiny_params(epochs=12, max_train_images=4, lr=0.003, patience=20, scheduler="cosine")
    train(processed, params, tmp_path / "models", tmp_path / "train.json", tmp_path / "history.csv")
    with (tmp_path / "history.csv").open() as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0], losses


def test_outputs_checkpoints_and_mlflow_run(processed, tmp_path, store):
    summary = train(processed, tiny_params(ema=0.0), tmp_path / "models", tmp_path / "train.json",
                    tmp_path / "history.csv")
    assert json.loads((tmp_path / "train.json").read_text()) == summary
    assert summary["epochs_run"] == 2 and 1 <= summary["best_epoch"] <= 2
    assert set(summary["best"]) == {"val_loss", "val_iou", "val_dice", "val_accuracy", "val_f1_weighted",
                                    "val_score"}  # no EMA: no val_raw_*
    model, config, state = load_checkpoint(tmp_path / "models")  # weights_only=True inside
    assert config.model.encoder == "resnet18" and state["epoch"] == summary["best_epoch"]
    assert config.image_size == SIZE  # the arrays' size it really trained at
    mask_logits, class_logits = model(torch.rand(2, 1, SIZE, SIZE))
    assert mask_logits.shape == (2, 1, SIZE, SIZE) and class_logits.shape == (2, 3)
    run = store.get_run(summary["run_id"])
    assert run.data.params["train.epochs"] == "2"
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val/dice")] == [1, 2]


def test_the_moving_average_is_validated_and_saved_beside_the_raw_weights(processed, tmp_path, store):
    summary = train(processed, tiny_params(epochs=1, ema=0.5, validate_raw=True), tmp_path / "models",
                    tmp_path / "train.json", tmp_path / "history.csv")
    assert {"val_raw_dice", "val_raw_iou", "val_raw_accuracy"} <= set(summary["best"])
    quiet = train(processed, tiny_params(epochs=1, ema=0.5), tmp_path / "quiet", tmp_path / "quiet.json",
                  tmp_path / "quiet.csv")
    assert not any(key.startswith("val_raw_") for key in quiet["best"])  # only when asked: it costs a pass
    best = torch.load(tmp_path / "models/best.pt", weights_only=True)
    last = torch.load(tmp_path / "models/last.pt", weights_only=True)
    averaged = {key.removeprefix("module."): value for key, value in last["ema"].items() if key != "n_averaged"}
    assert best["model"].keys() == averaged.keys()
    assert all(torch.equal(best["model"][key], averaged[key]) for key in averaged)  # best.pt holds the average
    assert not all(torch.equal(best["model"][key], last["model"][key]) for key in averaged)  # not the raw weights


def test_a_deeply_supervised_network_trains_and_reloads(processed, tmp_path, store):
    params = tiny_params(epochs=1, max_train_images=8)
    params = params.model_copy(update={"model": params.model.model_copy(update={"deep_supervision": 2})})
    train(processed, params, tmp_path / "models", tmp_path / "train.json", tmp_path / "history.csv")
    model, config, _ = load_checkpoint(tmp_path / "models")  # rebuilt from its configuration, heads and all
    assert config.model.deep_supervision == 2
    assert any(key.startswith("deep_supervision.heads.") for key in model.state_dict())
    mask_logits, _ = model(torch.rand(1, 1, SIZE, SIZE))
    assert mask_logits.shape == (1, 1, SIZE, SIZE)


def read_last(path):
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):  # not there yet (writes are atomic, so never half-written)
        return None


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_killed_training_resumes_from_the_last_finished_epoch(processed, tmp_path, store):
    # With a moving average of the weights: its state is resumed too.
    (tmp_path / "params.yaml").write_text(json.dumps(tiny_params(epochs=6, ema=0.9).model_dump(mode="json")))
    command = [sys.executable, "-m", "busi", "train", "--data", str(processed), "--out", "models"]
    env = run_env(MLFLOW_TRACKING_URI=store.tracking_uri)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = read_last(tmp_path / "models/last.pt")
        if state and state["epoch"] >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = read_last(tmp_path / "models/last.pt")
    assert not killed_at["finished"] and killed_at["epoch"] < 6

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from epoch {killed_at['epoch']} of 6" in result.stdout
    final = read_last(tmp_path / "models/last.pt")
    assert final["finished"] and [row["epoch"] for row in final["history"]] == [1, 2, 3, 4, 5, 6]
    assert final["history"][: killed_at["epoch"]] == killed_at["history"]  # the finished epochs are kept
    assert final["run_id"] == killed_at["run_id"]  # the same MLflow run continues
    assert final["ema"]["n_averaged"] > killed_at["ema"]["n_averaged"]  # the average went on, not restarted
    steps = [m.step for m in store.get_metric_history(final["run_id"], "train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_of_another_configuration_is_not_resumed(processed, tmp_path, store):
    train(processed, tiny_params(epochs=1), tmp_path / "models", tmp_path / "a.json", tmp_path / "a.csv")
    summary = train(processed, tiny_params(epochs=2, lr=0.0005), tmp_path / "models", tmp_path / "b.json",
                    tmp_path / "b.csv")
    assert summary["epochs_run"] == 2
    assert summary["run_id"] != json.loads((tmp_path / "a.json").read_text())["run_id"]


def test_monitor_last_keeps_the_final_epoch_with_no_early_stopping(processed, tmp_path, store):
    # patience 1: a picking monitor would stop after the first epoch that fails to improve; "last" never stops.
    summary = train(processed, tiny_params(epochs=3, monitor="last", patience=1, ema=0.5), tmp_path / "models",
                    tmp_path / "train.json", tmp_path / "history.csv")
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 3 and summary["monitor"] == "last"
    best = torch.load(tmp_path / "models/best.pt", weights_only=True)
    last = torch.load(tmp_path / "models/last.pt", weights_only=True)
    averaged = {key.removeprefix("module."): value for key, value in last["ema"].items() if key != "n_averaged"}
    assert best["epoch"] == 3 and all(torch.equal(best["model"][key], averaged[key]) for key in averaged)


def test_a_row_replaces_the_kept_one_by_the_monitor():
    kept, row = {"val_dice": 0.60, "val_loss": 1.00}, {"val_dice": 0.58, "val_loss": 0.90}
    assert not is_better(row, kept, "val_dice")  # Dice is maximised: 0.58 < 0.60
    assert is_better(row, kept, "val_loss")  # the loss is minimised: 0.90 < 1.00
    assert is_better(row, kept, "last") and is_better(kept, row, "last")  # every epoch replaces the last


def test_the_epoch_line_says_what_it_shows():
    row = {"epoch": 3, "train_loss": 1.23456, "train_iou": 0.3691, "val_loss": 1.0861, "val_iou": 0.419,
           "val_dice": 0.5912, "val_accuracy": 0.4871, "train_images_per_s": 28.66}
    best = {"epoch": 2, "val_dice": 0.6}
    # 20, 22 and 24 s so far: 22 s an epoch on average, 7 epochs to go -> 154 s = 2.57 min at most
    assert progress_line(row, 10, [20.0, 22.0, 24.0], best, "val_dice") == (
        "epoch 3/10  train: loss 1.2346 iou 0.369  val: loss 1.0861 iou 0.419 dice 0.591 acc 0.487  |  "
        "24 s (28.7 img/s), at most 2.6 min left  |  best val_dice 0.600 (epoch 2)")
    assert progress_line(row, 10, [20.0, 22.0, 24.0], row, "last").endswith("min left  |  the last epoch kept")


def start_training(tmp_path, processed, store, epochs: int):
    (tmp_path / "params.yaml").write_text(json.dumps(tiny_params(epochs=epochs).model_dump(mode="json")))
    command = [sys.executable, "-m", "busi", "train", "--data", str(processed), "--out", "models"]
    env = run_env(MLFLOW_TRACKING_URI=store.tracking_uri)
    return command, env, subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)


def signal_after_epoch(process, last_pt, signum, epoch: int = 2) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = read_last(last_pt)
        if state and state["epoch"] >= epoch:
            process.send_signal(signum)
            break
        time.sleep(0.05)
    output = process.communicate()[0]
    return read_last(last_pt) | {"output": output}


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_sigterm_closes_the_run_as_killed_and_the_next_start_resumes_it(processed, tmp_path, store):
    # A timeout or a cancelled CI job sends SIGTERM: the run must not stay RUNNING forever.
    command, env, process = start_training(tmp_path, processed, store, epochs=30)
    killed = signal_after_epoch(process, tmp_path / "models/last.pt", signal.SIGTERM)
    assert process.returncode == 130 and "train: stopped (SIGTERM)" in killed["output"], killed["output"]
    assert "Traceback" not in killed["output"]
    assert store.get_run(killed["run_id"]).info.status == "KILLED"
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from epoch {killed['epoch']} of 30" in result.stdout
    assert store.get_run(killed["run_id"]).info.status == "FINISHED"  # the same run, now done


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_the_state_outside_models_survives_its_replacement_as_dvc_exp_run_does_it(processed, tmp_path, store):
    """`dvc exp run` checks out the baseline's models/ before it runs: models/last.pt is replaced (unlinked and
    written anew). The unfinished state kept under .resume/ is what the next start resumes from."""
    command, env, process = start_training(tmp_path, processed, store, epochs=30)
    killed = signal_after_epoch(process, tmp_path / "models/last.pt", signal.SIGKILL)
    slots = list((tmp_path / ".resume").glob("*.pt"))
    kept = torch.load(slots[0], weights_only=True)
    assert len(slots) == 1 and kept["epoch"] >= 2 and not kept["finished"]
    finished_elsewhere = {**killed, "finished": True, "fingerprint": "another configuration"}
    finished_elsewhere.pop("output")
    (tmp_path / "models/last.pt").unlink()
    torch.save(finished_elsewhere, tmp_path / "models/last.pt")

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from epoch {kept['epoch']} of 30 ({slots[0]})" in result.stdout
    final = read_last(tmp_path / "models/last.pt")
    assert final["finished"] and final["run_id"] == killed["run_id"] and len(final["history"]) == final["epoch"]
    assert store.get_run(killed["run_id"]).info.status == "FINISHED"
    assert not list((tmp_path / ".resume").glob("*.pt"))  # a finished training leaves nothing behind
