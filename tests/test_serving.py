"""The logged MLflow model: the predictor folder as a models-from-code pyfunc. Images of any size and mode go in
as base64 PNGs; each comes back with its mask at its own size, its label and class probabilities, the same as
the predictor gives. Served for real with `mlflow models serve` on 127.0.0.1."""

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from busi import CLASSES, tracking
from busi.config import load_params
from busi.model import serving
from busi.model.postprocessing import PostProcessing
from busi.model.predictor import Predictor, load_predictor
from conftest import PARAMS_FILE, REPO, free_port, start_server, stop_server, untrained_network, wait_until_up
from synthetic import speckle

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory) -> Path:
    network, config = untrained_network(SIZE)
    folder = tmp_path_factory.mktemp("predictor") / "predictor"
    Predictor([network], [config],
              PostProcessing(threshold=0.5, flip_tta=True, label_from_mask=True)).save(folder)
    return folder


def png(array: np.ndarray, mode: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [speckle(rng, 90, 130), speckle(rng, 301, 207), np.zeros((50, 70), np.uint8)]


@pytest.fixture
def model_uri(predictor_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    tracking.start_run(load_params(PARAMS_FILE))
    uri = tracking.log_model(predictor_dir, serving)
    tracking.end_run()
    yield uri
    mlflow.set_tracking_uri(None)


def test_the_logged_model_answers_as_the_predictor(model_uri, predictor_dir, images, tmp_path):
    files = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    assert not list(files.rglob("*.pkl"))  # models from code: nothing to unpickle
    assert (files / "code" / "busi" / "model" / "serving.py").is_file()
    requirements = (files / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and any(
        r.startswith("safetensors==") for r in requirements)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["label", *CLASSES, "lesion_area_px", "height", "width", "mask"]
    assert (files / "input_example.json").is_file()

    model = mlflow.pyfunc.load_model(model_uri)
    rgb = np.dstack([images[0]] * 3)  # the same pixels in RGB and in 16 bits give the same answer
    request = pd.DataFrame({"image": [png(images[0]), png(images[1]), png(images[2]), png(rgb),
                                      png(images[0].astype(np.uint16) * 257)]})
    answer = model.predict(request)
    expected = load_predictor(predictor_dir).predict([images[0], images[1], images[2], images[0], images[0]])
    assert list(answer.columns) == ["label", *CLASSES, "lesion_area_px", "height", "width", "mask"]
    for row, prediction in zip(answer.itertuples(), expected, strict=True):
        mask = decode_mask(row.mask)
        assert mask.shape == prediction.mask.shape == (row.height, row.width)
        np.testing.assert_array_equal(mask > 0, prediction.mask)
        assert row.lesion_area_px == np.count_nonzero(mask) and row.label == prediction.label
        assert [getattr(row, name) for name in CLASSES] == pytest.approx(list(prediction.probabilities.values()))
        assert (row.label == "normal") == (row.lesion_area_px == 0)  # labels follow the mask in this predictor
    assert 0 < answer.lesion_area_px[0] < 90 * 130
    first = answer.drop(columns="mask").iloc[0].to_dict()  # equal up to float rounding at other batch positions
    assert answer.drop(columns="mask").iloc[3].to_dict() == pytest.approx(first)
    assert answer.drop(columns="mask").iloc[4].to_dict() == pytest.approx(first)

    with pytest.raises(MlflowException, match="row 1: 'image' is not valid base64"):
        model.predict(pd.DataFrame({"image": [png(images[0]), "not base64!"]}))
    with pytest.raises(MlflowException, match="row 0: not a readable PNG or JPEG"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow  # a whole process or training (tens of seconds)
def test_mlflow_models_serve_answers_a_real_request(model_uri, images, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    server = start_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                           "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], log,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[png(images[1])]]}})
        assert status == 200, body
        (answer,) = body["predictions"]
        assert decode_mask(answer["mask"]).shape == (301, 207) == (answer["height"], answer["width"])
        assert answer["label"] in CLASSES and sum(answer[name] for name in CLASSES) == pytest.approx(1, abs=1e-5)
        assert (answer["label"] == "normal") == (answer["lesion_area_px"] == 0)

        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}})
        # One line of our own: MLflow would wrap it in "Failed to predict data '<the input>'. Error: ..."
        assert status == 400 and body["message"].startswith("row 0: 'image' is not valid base64"), body
        assert "\n" not in body["message"] and "Failed to predict" not in body["message"]
        # Bounded per request, from the headers, before decoding: two blank 7000x6000 scans (84 million pixels in
        # a body of a few hundred KB) and 65 rows are refused with one message; the next good request is answered.
        blank = png(np.zeros((6000, 7000), np.uint8))
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[blank], [blank]]}})
        assert status == 400 and body["message"].startswith("the request's images hold 84 million pixels"), body
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[png(images[2])]] * 65}})
        assert status == 400 and body["message"] == "65 rows: at most 64 images a request", body
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[png(images[1])]]}})
        assert status == 200 and body["predictions"][0]["height"] == 301
    finally:
        stop_server(server)
