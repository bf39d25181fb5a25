"""One model, one answer, on real data: `predict` (no flags) and the served MLflow model against the evaluate
stage's own test predictions (metrics/plots/per_image.csv).

Run from the repository root after `dvc repro`:

    PYTHONPATH=src python bench/agreement.py [--serve]

It predicts every test image from its raw file, as a user would, and counts the images whose label equals
`predicted_label` and whose lesion area is within 1% of `predicted_area_px`. With --serve it also starts
`mlflow models serve` on 127.0.0.1 with the training run's logged model and sends every test image to it.
"""

import argparse
import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path.cwd()


def agreement(rows: list[dict], answers: list[dict]) -> str:
    labels = sum(row["predicted_label"] == answer["label"] for row, answer in zip(rows, answers, strict=True))
    areas = sum(abs(answer["lesion_area_px"] - int(row["predicted_area_px"]))
                <= 0.01 * max(int(row["predicted_area_px"]), 1) for row, answer in zip(rows, answers, strict=True))
    exact = sum(answer["lesion_area_px"] == int(row["predicted_area_px"]) for row, answer in zip(rows, answers,
                                                                                                  strict=True))
    inconsistent = sum((answer["label"] == "normal") != (answer["lesion_area_px"] == 0) for answer in answers)
    return (f"labels {labels}/{len(rows)}, area within 1% {areas}/{len(rows)} (identical {exact}), "
            f"'normal' with a lesion or a lesion without a class: {inconsistent}")


def serve(model_uri: str, paths: list[Path]) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                time.sleep(1)
        answers = []
        for path in paths:  # one request per image, as the README's curl
            body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(path.read_bytes()).decode()]]}}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answers.append(json.loads(response.read())["predictions"][0])
        return answers
    finally:
        os.killpg(server.pid, signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="also send every test image to the served model")
    args = parser.parse_args()
    with (ROOT / "metrics/plots/per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    root = ROOT / "data/raw/Dataset_BUSI_with_GT"
    paths = [root / row["label"] / f"{row['image_id']}.png" for row in rows]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "busi", "predict", *map(str, paths), "--out", out], check=True)
        answers = [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]
        print(f"predict (no flags), {time.perf_counter() - started:.0f} s: {agreement(rows, answers)}")
    if args.serve:
        run_id = json.loads((ROOT / "metrics/train.json").read_text())["run_id"]
        import mlflow

        from busi.tracking import tracking_uri

        model_uri = mlflow.MlflowClient(tracking_uri()).get_run(run_id).data.tags["busi.model_uri"]
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
        started = time.perf_counter()
        answers = serve(model_uri, paths)
        print(f"served {model_uri}, {time.perf_counter() - started:.0f} s: {agreement(rows, answers)}")


if __name__ == "__main__":
    main()
