"""Inference shared by evaluate and predict: probabilities at the training size, mapped back to each image's
original resolution, thresholded, optionally reduced to the largest connected component."""

import cv2
import numpy as np
import torch
from torch import nn

from busi import CLASSES


@torch.no_grad()
def predict_arrays(model: nn.Module, images: np.ndarray, batch_size: int = 16,
                   flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lesion probabilities [N,S,S] and class probabilities [N,3] for uint8 grayscale images [N,S,S];
    `flip` averages them with those of the left-right mirrored images (test-time augmentation)."""
    model.eval()
    device = next(model.parameters()).device
    masks, classes = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).float().div_(255).to(device)
        mask_probs, class_probs = probabilities(model, batch)
        if flip:
            mirrored_masks, mirrored_classes = probabilities(model, batch.flip(3))
            mask_probs, class_probs = (mask_probs + mirrored_masks.flip(3)) / 2, (class_probs + mirrored_classes) / 2
        masks.append(mask_probs[:, 0].cpu().numpy())
        classes.append(class_probs.cpu().numpy())
    if not masks:
        return np.zeros((0, *images.shape[1:]), np.float32), np.zeros((0, 3), np.float32)
    return np.concatenate(masks), np.concatenate(classes)


def probabilities(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask_logits, class_logits = model(batch.contiguous(memory_format=torch.channels_last))
    return torch.sigmoid(mask_logits.float()), torch.softmax(class_logits.float(), dim=1)


def to_original_size(probability: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a probability map back to the image's own size (threshold after, not before)."""
    return cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)


def binarize(probability: np.ndarray, threshold: float, largest_component: bool) -> np.ndarray:
    mask = probability >= threshold
    if largest_component and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count > 2:  # background + more than one component
            mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return mask


def class_labels(class_probabilities: np.ndarray, predicted_area: np.ndarray, from_mask: bool) -> np.ndarray:
    """Class indices: the head's most probable class, or, `from_mask`, the class that the predicted mask implies:
    no lesion pixel -> normal; a lesion -> benign or malignant, whichever the head finds more probable."""
    if not from_mask:
        return class_probabilities.argmax(1)
    normal = CLASSES.index("normal")
    lesion = np.where(np.arange(len(CLASSES)) == normal, -np.inf, class_probabilities).argmax(1)
    return np.where(np.asarray(predicted_area) > 0, lesion, normal)
