"""Training the crop network (busi.model.crop): benign against malignant on the square around each lesion of the
training split, cut from the original image (stage train_crop; busi.stages.train_crop).

It learns on the reference masks' largest region, as prediction crops the predicted mask's largest region. The
crop is jittered the way a predicted mask would move it: its margin drawn from 0.2 to 0.9 of the lesion's longer
side (a predicted region is often smaller or larger than the lesion), its centre shifted by up to a tenth of
its side; plus mirroring and brightness and contrast. Class-weighted cross-entropy (malignant lesions are a
third), AdamW with a one-cycle schedule, in bf16 autocast where the CPU supports it (`crop.precision`). On a
2-core CPU, about 3 minutes for BUSI's training split at 40 epochs.
"""

import time

import numpy as np
import torch
from torch.nn import functional as F

from busi import CLASSES, BusiError, autocast_dtype
from busi.config import CropConfig, CropParams
from busi.model.crop import CropClassifier, box_of, build_crop_network, cut
from busi.model.postprocessing import keep_largest_region

MALIGNANT = CLASSES.index("malignant")
MARGINS = (0.2, 0.9)  # training margins around the lesion's box (prediction uses params' crop.margin)
SHIFT = 0.1  # of the crop's side, each way


def train_crop_network(images: list[np.ndarray], references: list[np.ndarray], labels: np.ndarray,
                       params: CropParams) -> tuple[CropClassifier, dict]:
    """The crop network trained on the lesion images among `images` (8-bit grayscale at their own size, with
    their boolean reference masks); returns it and a summary (images, epochs, last epoch's loss, minutes)."""
    started = time.perf_counter()
    lesions = [i for i, (label, mask) in enumerate(zip(labels, references, strict=True))
               if CLASSES[label] != "normal" and mask.any()]
    target = torch.tensor([int(labels[i] == MALIGNANT) for i in lesions])
    counts = np.bincount(target.numpy(), minlength=2)
    if counts.min() == 0:
        raise BusiError(f"the crop network needs benign and malignant lesions to learn from; the training split "
                        f"holds {counts[0]} benign and {counts[1]} malignant")
    boxes = [box_of(keep_largest_region(references[i])) for i in lesions]
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_crop_network().to(device)
    weight = torch.tensor(len(target) / (2 * counts), dtype=torch.float32, device=device)  # balanced classes
    steps = params.epochs * int(np.ceil(len(lesions) / params.batch_size))
    optimizer = torch.optim.AdamW(network.parameters(), lr=params.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=steps, pct_start=0.1)
    amp = autocast_dtype(params.precision, device)  # bf16 where the CPU runs it natively: about twice as fast

    network.train()
    for epoch in range(1, params.epochs + 1):
        order, losses = rng.permutation(len(lesions)), []
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            x = torch.from_numpy(np.stack([jittered(images[lesions[i]], boxes[i], params.size, rng) for i in batch]))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = network(x.unsqueeze(1).to(device))
            loss = F.cross_entropy(logits.float(), target[batch].to(device), weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if epoch % 10 == 0 or epoch == params.epochs:
            print(f"train_crop: epoch {epoch}/{params.epochs}, loss {np.mean(losses):.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    config = CropConfig(size=params.size, margin=params.margin)
    summary = {"images": len(lesions), "benign": int(counts[0]), "malignant": int(counts[1]),
               "epochs": params.epochs, "precision": "bf16" if amp else "fp32", "loss": float(np.mean(losses)),
               "minutes": round((time.perf_counter() - started) / 60, 2)}
    return CropClassifier([network.cpu().eval()], config), summary


def jittered(image: np.ndarray, box: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One training crop, float32 in [0, 1]: a random margin and shift, mirrored half the time, brightness and
    contrast jittered by up to 20% and 0.1."""
    crop = cut(image, box, size, rng.uniform(*MARGINS), tuple(rng.uniform(-SHIFT, SHIFT, 2)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    return np.clip(crop / 255 * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1).astype(np.float32)
