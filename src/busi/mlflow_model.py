"""The MLflow model, logged as code (busi.tracking.log_model): it rebuilds the U-Net from the checkpoint's
weights and params (torch.load weights_only=True), so loading or serving it never unpickles code.

predict(images): uint8 (or integer, as JSON delivers them) grayscale images are scaled by 1/255, float ones
are taken as [0, 1]; shape [N,H,W] or [N,1,H,W] at the training size. It returns a dict: "mask", the lesion
probability per pixel [N,H,W], and one class probability [N] per name in busi.CLASSES.
"""

import mlflow
import numpy as np
import torch

from busi import CLASSES
from busi.model import load_checkpoint, predict_batch

BATCH = 16  # images per forward pass: bounds memory for large requests


class BusiModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, params, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.size = params.preprocess.image_size

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        images = to_tensor(np.asarray(model_input), self.size)
        masks, probs = zip(*(predict_batch(self.model, batch) for batch in images.split(BATCH)), strict=True)
        probs = torch.cat(probs).numpy()
        return {"mask": torch.cat(masks)[:, 0].numpy(), **{name: probs[:, i] for i, name in enumerate(CLASSES)}}


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (1, size, size):
        raise ValueError(f"expected grayscale images [N,{size},{size}] or [N,1,{size},{size}], got {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        return torch.from_numpy(images.astype(np.float32) / 255)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected 8-bit or float images, got dtype {images.dtype}")
    return torch.from_numpy(images.astype(np.float32))


mlflow.models.set_model(BusiModel())
