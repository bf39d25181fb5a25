"""The MLflow model, logged as code (busi.tracking.log_model) around the predictor folder: loading or serving it
rebuilds the networks from safetensors weights and never unpickles code.

Input: a DataFrame with one column, `image`: per row a base64-encoded PNG or JPEG of any size and mode (decoded
as `python -m busi predict` reads files: 8-bit grayscale). Output, per row: `label`, the class probabilities
(`benign`, `malignant`, `normal`), `lesion_area_px`, `height`, `width`, and `mask`, a base64 PNG (0/255) of the
image's own size. The same predictor, hence the same answer, as `predict` and the evaluate stage.

    mlflow models serve -m models:/<model id> --env-manager local --port 5001
    curl -H 'Content-Type: application/json' -d @request.json http://127.0.0.1:5001/invocations
    # request.json: {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"]]}}
"""

import base64
import binascii
import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from busi import CLASSES, BusiError
from busi.data.images import decode_gray
from busi.model.predictor import load_predictor

MAX_REQUEST_IMAGE_BYTES = 32 * 2**20  # one encoded image; larger is refused before decoding
# One request's bounds, checked on the images' headers before any is decoded: a few MB of blank 7000x7000 PNGs
# would otherwise take gigabytes and tens of seconds (and MLflow's timeout answers 504 but lets the work go on).
MAX_REQUEST_ROWS = 64
MAX_REQUEST_PIXELS = 64_000_000  # all images of a request together: one 7000x7000 scan fits
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", name) for name in CLASSES),
                    ColSpec("long", "lesion_area_px"), ColSpec("long", "height"), ColSpec("long", "width"),
                    ColSpec("string", "mask")]),
)


class BusiModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = load_predictor(context.artifacts["predictor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input:
            raise invalid("expected a DataFrame with a column 'image': base64-encoded PNG or JPEG, one per row")
        if len(model_input) > MAX_REQUEST_ROWS:
            raise invalid(f"{len(model_input)} rows: at most {MAX_REQUEST_ROWS} images a request")
        encoded = [decode_base64(value, row) for row, value in enumerate(model_input["image"])]
        pixels = sum(header_pixels(data, row) for row, data in enumerate(encoded))
        if pixels > MAX_REQUEST_PIXELS:
            raise invalid(f"the request's images hold {pixels / 1e6:.0f} million pixels, more than the "
                          f"{MAX_REQUEST_PIXELS / 1e6:.0f} million a request may: send fewer or smaller images")
        images = [decode_request_image(data, row) for row, data in enumerate(encoded)]
        rows = []
        for prediction in self.predictor.predict(images):
            record = prediction.record()
            rows.append({"label": record["label"], **record["probabilities"],
                         **{key: record[key] for key in ("lesion_area_px", "height", "width")},
                         "mask": encode_png(prediction.mask.astype(np.uint8) * 255)})
        return pd.DataFrame(rows, columns=[spec.name for spec in SIGNATURE.outputs.inputs])


def decode_base64(value, row: int) -> bytes:
    if not isinstance(value, str | bytes):
        raise invalid(f"row {row}: 'image' must be a base64 string, got {type(value).__name__}")
    if len(value) > MAX_REQUEST_IMAGE_BYTES * 4 // 3 + 4:
        raise invalid(f"row {row}: image larger than {MAX_REQUEST_IMAGE_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"row {row}: 'image' is not valid base64 ({err})") from None


def header_pixels(data: bytes, row: int) -> int:
    """Width x height from the image's header, without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise invalid(f"row {row}: not a readable PNG or JPEG ({type(err).__name__})") from None


def decode_request_image(data: bytes, row: int) -> np.ndarray:
    try:
        return decode_gray(io.BytesIO(data), f"row {row}")
    except BusiError as err:
        raise invalid(f"{err} (expected a base64-encoded PNG or JPEG)") from None


def encode_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> pd.DataFrame:
    """A 64x48 grayscale gradient, as a request carries it."""
    image = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    return pd.DataFrame({"image": [encode_png(image)]})


class InvalidRequest(MlflowException):
    """A bad request, answered with HTTP 400 and this one line. MLflow's scoring server rewrites the message of a
    predict error as "Failed to predict data '<the whole input>'. Error: ..." (the client's data echoed back in
    a multi-line text); the message of this exception is set once and keeps its own line."""

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_line"):  # MlflowException.__init__ sets it; the scoring server's rewrite is ignored
            self._line = value


def invalid(message: str) -> MlflowException:
    return InvalidRequest(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(BusiModel())
