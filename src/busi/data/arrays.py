"""The preprocessed split arrays (no PNG decoding per epoch), the merged reference masks at their original size
for evaluation, and the training dataset with its albumentations augmentation, every transform and probability
taken from params."""

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from busi import BusiError
from busi.config import AugmentParams


def load_split(processed_dir: Path, split: str) -> dict[str, np.ndarray]:
    """images [N,S,S] uint8, masks [N,S,S] 0/1, labels [N], ids [N], groups [N] (the scan), sizes [N,2] (original
    height, width)."""
    path = Path(processed_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as err:
        raise BusiError(f"{path}: cannot read preprocessed split ({err}); run `dvc repro preprocess`") from None


def read_references(masks_dir: Path, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The merged 0/255 reference mask of every image of a split, at its original size, as booleans."""
    references = []
    for image_id, size in zip(arrays["ids"], arrays["sizes"], strict=True):
        path = Path(masks_dir) / f"{image_id}.png"
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise BusiError(f"{path}: reference mask missing or unreadable; run `dvc repro merge_masks`")
        if mask.shape != tuple(size):
            raise BusiError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, the image was {size[0]}x{size[1]}")
        references.append(mask > 0)
    return references


def train_transform(params: AugmentParams, seed: int) -> A.Compose:
    """The study's augmentations (CLAHE, median and Gaussian blur) plus flips, affine and brightness/contrast."""
    affine, blur = params.affine, params.gaussian_blur
    return A.Compose(
        [
            A.HorizontalFlip(p=params.horizontal_flip),
            A.Affine(scale=(1 - affine.scale, 1 + affine.scale), rotate=(-affine.rotate, affine.rotate),
                     translate_percent=(-affine.translate, affine.translate), p=affine.p),
            A.RandomBrightnessContrast(brightness_limit=params.brightness_contrast.limit,
                                       contrast_limit=params.brightness_contrast.limit, p=params.brightness_contrast.p),
            A.CLAHE(clip_limit=params.clahe.clip_limit, p=params.clahe.p),
            A.MedianBlur(blur_limit=(3, params.median_blur.max_kernel | 1), p=params.median_blur.p),
            A.GaussianBlur(blur_limit=(3, blur.max_kernel | 1), p=blur.p),
        ],
        seed=seed,
    )


class SegmentationDataset(Dataset):
    """(image [1,S,S] float in [0,1], mask [1,S,S] float 0/1, label) triples, augmented when a transform is given."""

    def __init__(self, arrays: dict[str, np.ndarray], transform: A.Compose | None = None):
        self.images, self.masks, self.labels = arrays["images"], arrays["masks"], arrays["labels"]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float().div_(255)
        mask = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0).float()
        return image, mask, int(self.labels[i])
