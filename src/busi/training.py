"""Training: the U-Net on the preprocessed arrays, tracked in MLflow, resumable from its last epoch (the train
stage, busi.stages.train, and each fold of a cross-validation, busi.distributed, run it).

Optionally, self-supervised pretraining first (busi.pretraining). Loss: Dice + BCE on the mask (smp's losses)
plus weighted cross-entropy on the class. AdamW (the study's L2), cosine or reduce-on-plateau schedule, an
optional moving average of the weights (EMA), early stopping and best-checkpoint selection on a validation metric.
"""

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from busi import CLASSES, autocast_dtype, thread_count, tracking
from busi.config import NetworkConfig, Params
from busi.data.arrays import SegmentationDataset, load_split, train_transform
from busi.files import atomic_file
from busi.model.checkpoint import save_checkpoint
from busi.model.network import build_model, coarse_mask_logits
from busi.pretraining import pretrain

MINIMIZED = {"val_loss"}  # every other monitor (dice, iou, accuracy, F1, score) is maximised


def train(processed_dir: Path, params: Params, out_dir: Path, metrics_path: Path, history_path: Path,
          run: tracking.TrainingRun | None = None) -> dict:
    """Train, write best.pt/last.pt in out_dir, the per-epoch history CSV and the summary JSON; returns it.
    `run` records the training (MLflow: its own run, or a fold's child run of a cross-validation)."""
    cfg = params.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(thread_count())
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    train_arrays, val_arrays = load_split(processed_dir, "train"), load_split(processed_dir, "val")
    if cfg.max_train_images:  # a seeded random subset, for quick smoke runs
        keep = np.random.default_rng(cfg.seed).permutation(len(train_arrays["labels"]))[: cfg.max_train_images]
        train_arrays = {key: value[np.sort(keep)] for key, value in train_arrays.items()}

    parts = build(params, train_arrays, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint, data = params_fingerprint(params), data_fingerprint(train_arrays, val_arrays)
    slot = resume_slot(out_dir, fingerprint + data)
    progress = resume(parts, unfinished_state(fingerprint, data, [out_dir / "last.pt", slot], device), cfg.epochs)
    run = run or tracking.TrainingRun(params)

    def checkpoint(finished: bool) -> None:  # the state a killed training resumes from, every epoch
        save_checkpoint(out_dir / "last.pt", parts.model, parts.network, epoch=progress.history[-1]["epoch"],
                        optimizer=parts.optimizer.state_dict(), scheduler=parts.scheduler.state_dict(),
                        history=progress.history, best=progress.best, run_id=progress.run_id,
                        fingerprint=fingerprint, data=data, finished=finished,
                        **({"ema": parts.ema.state_dict()} if parts.ema else {}))
        keep_for_resume(out_dir / "last.pt", slot, finished)

    progress.run_id = run.started(progress.run_id)
    try:
        if cfg.pretrain_epochs and progress.start == 1:  # a resumed training finds the pretrained weights in last.pt
            pretrain(parts.model, train_arrays["images"], cfg.pretrain_epochs, cfg.batch_size, cfg.lr, cfg.seed,
                     parts.device, parts.amp_dtype, run.epoch)
        fit(parts, params, train_arrays, val_arrays, progress, out_dir / "best.pt", checkpoint, run.epoch)
        write_history(progress.history, history_path)
        summary = {"run_id": progress.run_id, "fingerprint": fingerprint, "best_epoch": progress.best["epoch"],
                   "epochs_run": len(progress.history), "monitor": cfg.monitor,
                   "best": {k: v for k, v in progress.best.items() if k.startswith("val_")}}
        with atomic_file(metrics_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        run.finished(progress.history)
    except BaseException as err:  # a crash, Ctrl-C or SIGTERM: the run says so instead of staying RUNNING
        run.failed(err)
        raise
    return summary


@dataclass
class Parts:
    """What the loop trains with, built from the params (`build`)."""
    network: NetworkConfig  # what rebuilds the network: its model section and the size it really trained at
    model: nn.Module
    ema: AveragedModel | None  # the moving average of the weights: what gets validated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    loss_fn: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None


@dataclass
class Progress:
    """How far a training got: what a resumed one starts from."""
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    run_id: str | None = None
    start: int = 1  # the next epoch


def build(params: Params, train_arrays: dict, device: torch.device) -> Parts:
    cfg = params.train
    torch.manual_seed(cfg.seed)
    model = build_model(params.model).to(device, memory_format=torch.channels_last)
    # The moving average of the weights (BatchNorm statistics included) is what gets validated and saved.
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True) if cfg.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        mode = "min" if cfg.monitor in MINIMIZED else "max"
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, patience=max(1, cfg.patience // 3))
    # The minority classes count as much as the majority: either each class is a third of every epoch (balanced
    # sampling, plain cross-entropy) or every image once with the cross-entropy weighted by class (as sklearn's
    # "balanced": n / (classes * count); absent classes weigh 1). Never both: that would over-correct.
    counts = np.bincount(train_arrays["labels"], minlength=len(CLASSES))
    class_weights = np.where(counts > 0, counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), 1.0)
    if cfg.sampling == "balanced":
        class_weights = np.ones(len(CLASSES))
    loss_fn = SegmentationLoss(torch.tensor(class_weights, dtype=torch.float32, device=device), cfg.class_loss_weight,
                               cfg.label_smoothing, per_image=cfg.dice == "image")
    network = NetworkConfig(model=params.model, image_size=int(train_arrays["images"].shape[1]))
    return Parts(network, model, ema, optimizer, scheduler, loss_fn, device, autocast_dtype(cfg.precision, device))


def resume(parts: Parts, state: dict | None, epochs: int) -> Progress:
    """The progress of an unfinished training of the same configuration on the same data (`state`, its last.pt),
    its weights, optimizer and schedule loaded into `parts`; a fresh start when there is none."""
    if state is None:
        return Progress()
    parts.model.load_state_dict(state["model"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    print(f"resuming from epoch {state['epoch']} of {epochs} ({state['path']})")
    return Progress(state["history"], state["best"], state["run_id"], state["epoch"] + 1)


def fit(parts: Parts, params: Params, train_arrays: dict, val_arrays: dict, progress: Progress, best_path: Path,
        checkpoint, on_epoch) -> None:
    """The loop: an epoch of training, one of validation (of the EMA weights), best.pt when the monitor improves,
    `checkpoint(finished)` every epoch, `on_epoch(row)` for the tracker; early stopping after `patience`."""
    cfg, p = params.train, parts
    augment = train_transform(params.augment, cfg.seed)
    train_data, val_data = SegmentationDataset(train_arrays, augment), SegmentationDataset(val_arrays)
    seconds = []  # per epoch, in this process: the ETA
    for epoch in range(progress.start, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        # Seeding per epoch makes a resumed run draw the same batches and augmentations as an uninterrupted one.
        torch.manual_seed(cfg.seed + epoch)
        augment.set_random_seed(cfg.seed + epoch)
        drop_last = len(train_data) > cfg.batch_size  # a last batch of one image breaks BatchNorm
        batches = loader(train_data, cfg.batch_size, p.device, cfg.seed + epoch, shuffle=True, drop_last=drop_last,
                         balanced=cfg.sampling == "balanced")
        train_stats = run_epoch(p.model, batches, p.loss_fn, p.device, p.amp_dtype, p.optimizer, p.ema,
                                desc=f"epoch {epoch}")
        val_batches = loader(val_data, cfg.batch_size, p.device, cfg.seed + epoch)
        val_stats = run_epoch(p.ema.module if p.ema else p.model, val_batches, p.loss_fn, p.device, p.amp_dtype)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"val_{k}": v for k, v in val_stats.items() if k != "images_per_s"},
               "lr": p.optimizer.param_groups[0]["lr"]}
        row["val_score"] = (row["val_dice"] + row["val_f1_weighted"]) / 2  # both tasks: a checkpoint for each
        if p.ema is not None and cfg.validate_raw:  # the raw weights too, to show what the average adds
            raw_stats = run_epoch(p.model, val_batches, p.loss_fn, p.device, p.amp_dtype)
            row |= {f"val_raw_{k}": raw_stats[k] for k in ("dice", "iou", "accuracy")}
        progress.history.append(row)
        on_epoch(row)
        if progress.best is None or is_better(row, progress.best, cfg.monitor):
            progress.best = row
            save_checkpoint(best_path, p.ema.module if p.ema else p.model, p.network, epoch=epoch)
        if cfg.scheduler == "cosine":
            p.scheduler.step()
        else:
            p.scheduler.step(row[cfg.monitor])
        stop = epoch - progress.best["epoch"] >= cfg.patience
        checkpoint(finished=stop or epoch == cfg.epochs)
        seconds.append(time.perf_counter() - epoch_started)
        print(progress_line(row, cfg.epochs, seconds, progress.best, cfg.monitor), flush=True)
        if stop:
            print(f"early stop: no better {cfg.monitor} for {cfg.patience} epochs")
            break


def progress_line(row: dict, epochs: int, seconds: list[float], best: dict, monitor: str) -> str:
    """One line per epoch that says what it shows: train and validation apart, the epoch's time, the time left
    if training runs to the last epoch (early stopping may end it sooner), and the best epoch so far."""
    left = (epochs - row["epoch"]) * sum(seconds) / len(seconds)
    kept = "the last epoch kept" if monitor == "last" else f"best {monitor} {best[monitor]:.3f} (epoch {best['epoch']})"
    return (f"epoch {row['epoch']}/{epochs}  train: loss {row['train_loss']:.4f} iou {row['train_iou']:.3f}  "
            f"val: loss {row['val_loss']:.4f} iou {row['val_iou']:.3f} dice {row['val_dice']:.3f} "
            f"acc {row['val_accuracy']:.3f}  |  {seconds[-1]:.0f} s ({row['train_images_per_s']:.1f} img/s), "
            f"at most {left / 60:.1f} min left  |  {kept}")


class SegmentationLoss(nn.Module):
    """Dice + BCE on the lesion mask, plus class-balanced cross-entropy on the label (times `class_weight`). The
    Dice pools the batch's pixels, or with `per_image` is taken per lesion image and averaged. With deep
    supervision, the coarse lesion logits (finest first) are scored the same way against the mask averaged down to
    their size, each stage weighing half the one above (nnU-Net's weights), the weights summing to 1."""

    def __init__(self, class_weights: torch.Tensor, class_weight: float, label_smoothing: float = 0.0,
                 per_image: bool = False):
        super().__init__()
        self.dice = image_dice_loss if per_image else smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)
        self.bce = smp.losses.SoftBCEWithLogitsLoss()
        self.cross_entropy = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.class_weight = class_weight

    def forward(self, mask_logits, class_logits, masks, labels, coarse_mask_logits=()):
        scored = [(mask_logits, masks), *((logits, nn.functional.interpolate(masks, logits.shape[-2:], mode="area"))
                                          for logits in coarse_mask_logits)]
        weights = [0.5**stage for stage in range(len(scored))]
        mask_loss = sum(weight * (self.dice(logits.float(), target) + self.bce(logits.float(), target))
                        for weight, (logits, target) in zip(weights, scored, strict=True)) / sum(weights)
        return mask_loss + self.class_weight * self.cross_entropy(class_logits.float(), labels)


def image_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of each image that has a lesion, averaged over those images. Pooled over the batch, a small
    lesion's pixels are drowned by a large one's; here a missed small lesion costs as much as a missed large one.
    An image without a lesion has no Dice (BCE alone teaches it); a batch without any lesion gives 0."""
    probabilities, target = logits.sigmoid().flatten(1), masks.flatten(1)
    lesion = target.sum(1) > 0
    overlap = (probabilities * target).sum(1)[lesion]
    total = (probabilities.sum(1) + target.sum(1))[lesion]
    return (1 - 2 * overlap / total).mean() if lesion.any() else logits.sum() * 0


def run_epoch(model, batches, loss_fn, device, amp_dtype, optimizer=None, ema=None, desc=None) -> dict[str, float]:
    """One pass over `batches`: trains when an optimizer is given (updating `ema` after each step), else
    evaluates. Pooled IoU/Dice over pixels."""
    model.train(optimizer is not None)
    # Running sums stay on the device: no host synchronisation per step (only the terminal's bar reads them).
    total_loss, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    classes = len(CLASSES)
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=device)  # actual * classes + predicted
    stats = torch.zeros(4, dtype=torch.long, device=device)
    started = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty())
    with torch.set_grad_enabled(optimizer is not None):
        for images, masks, labels in bar:
            images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
            masks, labels = masks.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                mask_logits, class_logits = model(images)
                loss = loss_fn(mask_logits, class_logits, masks, labels, coarse_mask_logits(model))
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
            total_loss += loss.detach().double() * len(images)
            seen += len(images)
            confusion += torch.bincount(labels * classes + class_logits.argmax(1), minlength=classes * classes)
            tp, fp, fn, tn = smp.metrics.get_stats(mask_logits.detach().float().sigmoid(), masks.long(),
                                                   mode="binary", threshold=0.5)
            stats += torch.stack([tp.sum(), fp.sum(), fn.sum(), tn.sum()])
            if not bar.disable:
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", iou=f"{iou(stats.cpu()):.3f}",
                                img_s=f"{seen / (time.perf_counter() - started):.1f}")
    stats, confusion = stats.cpu(), confusion.cpu().reshape(classes, classes).numpy()
    return {"loss": total_loss.item() / seen, "iou": iou(stats), "dice": dice(stats),
            "accuracy": float(np.trace(confusion) / seen), "f1_weighted": f1_weighted(confusion),
            "images_per_s": seen / (time.perf_counter() - started)}


def iou(stats: torch.Tensor) -> float:
    tp, fp, fn, tn = stats
    return smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro").item()


def dice(stats: torch.Tensor) -> float:
    tp, fp, fn, tn = stats
    return smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro").item()


def f1_weighted(confusion: np.ndarray) -> float:
    """F1 per class averaged with the class counts as weights (sklearn's "weighted"), from a confusion matrix
    [actual, predicted]; a class never predicted has F1 0."""
    true_positives, actual, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    f1 = np.divide(2 * true_positives, actual + predicted, out=np.zeros(len(confusion)), where=actual + predicted > 0)
    return float((f1 * actual).sum() / max(actual.sum(), 1))


def ema_with_warmup(decay: float):
    """torch's EMA update with the usual warm-up: the decay grows as (1 + n) / (10 + n) up to `decay`, so that
    the average of a short run is not dominated by the random initial weights."""
    def update(averaged, current, num_averaged):
        n = num_averaged.item()
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, num_averaged)
    return update


def loader(data: SegmentationDataset, batch_size: int, device: torch.device, seed: int, shuffle: bool = False,
           drop_last: bool = False, balanced: bool = False) -> DataLoader:
    """Batches in the main process on the CPU (where workers would only compete with the model for the cores);
    on CUDA, augmentation in worker processes into pinned memory, each worker's augmentation seeded apart.
    `balanced`: an epoch of as many draws as images, with replacement, each class equally likely."""
    workers = min(4, thread_count()) if device.type == "cuda" else 0
    sampler = None
    if balanced:
        counts = np.bincount(data.labels)
        sampler = WeightedRandomSampler(torch.as_tensor(1.0 / counts[data.labels], dtype=torch.double), len(data),
                                        generator=torch.Generator().manual_seed(seed))
        shuffle = False  # the sampler draws in random order
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                      num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=partial(seed_worker, seed) if workers else None)


def seed_worker(seed: int, worker: int) -> None:
    transform = torch.utils.data.get_worker_info().dataset.transform
    if transform is not None:
        transform.set_random_seed(seed * 1000 + worker)


def is_better(row: dict, best: dict, monitor: str) -> bool:
    """Whether this epoch's row replaces the kept one: always with monitor "last" (nothing is picked)."""
    if monitor == "last":
        return True
    return row[monitor] < best[monitor] if monitor in MINIMIZED else row[monitor] > best[monitor]


def params_fingerprint(params: Params) -> str:
    """Identifies the training configuration: a checkpoint of another configuration is never resumed."""
    # Parameters at their defaults are left out, so that adding an optional parameter keeps earlier fingerprints.
    relevant = params.model_dump(mode="json", include={"model", "augment", "train"}, exclude_defaults=True)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def data_fingerprint(*splits: dict) -> str:
    """Identifies the training data (a changed split or image size is another training): a digest of the arrays."""
    digest = hashlib.sha256()
    for arrays in splits:
        for key in sorted(arrays):
            digest.update(key.encode() + str(arrays[key].shape).encode() + np.ascontiguousarray(arrays[key]).data)
    return digest.hexdigest()[:16]


# Where an unfinished training's state is also kept: outside DVC's outputs, because `dvc exp run` checks out the
# baseline's models/ from the cache before it runs, which replaces models/last.pt. One file per output folder and
# configuration (parallel experiments do not share one), removed when the training finishes.
RESUME_DIR = ".resume"


def resume_slot(out_dir: Path, fingerprint: str) -> Path:
    root = tracking.project_root()
    out = Path(out_dir).resolve()
    where = out.relative_to(Path.cwd().resolve()) if out.is_relative_to(Path.cwd().resolve()) else out
    name = hashlib.sha256(f"{where}|{fingerprint}".encode()).hexdigest()[:20]
    return root / RESUME_DIR / f"{name}.pt"


def keep_for_resume(last: Path, slot: Path, finished: bool) -> None:
    """A hard link to last.pt (no copy: the same file) while the training is unfinished, gone once it is done.
    DVC replaces files by unlinking them, so the link keeps the state whatever happens to models/."""
    if finished:
        slot.unlink(missing_ok=True)
        return
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = slot.with_name(f".{slot.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(last, tmp)
    os.replace(tmp, slot)  # atomic: a kill at any moment leaves the previous epoch's state or this one


def unfinished_state(fingerprint: str, data: str, paths: list[Path], device: torch.device) -> dict | None:
    """The first of `paths` that holds an unfinished training of these params on this data, loaded (with its
    "path")."""
    for path in paths:
        if not Path(path).is_file():
            continue
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("fingerprint") == fingerprint and state.get("data") == data and not state.get("finished"):
            return state | {"path": str(path)}
    return None


def is_trained(out_dir: Path, params: Params) -> bool:
    """Whether `out_dir` holds a finished training of exactly these params: best.pt beside the summary train()
    writes when it finishes, which names the params' fingerprint."""
    try:
        summary = json.loads((Path(out_dir) / "train.json").read_text())
    except (OSError, ValueError):
        return False
    return (Path(out_dir) / "best.pt").is_file() and summary.get("fingerprint") == params_fingerprint(params)


def write_history(history: list[dict], path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in history)
