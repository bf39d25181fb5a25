"""Small synthetic ultrasound-like images in BUSI's exact folder layout, for fast tests.

Covers what the real archive throws at a loader: several masks per image, 1-bit, RGB and RGBA masks,
colour (RGB) images, normal images with empty masks, and one scan filed twice: `malignant (2)` is a
crop of `benign (1)` re-scaled by 0.83 (a group whose members carry different labels: a conflict).
"""

import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

COUNTS = {"benign": 6, "malignant": 5, "normal": 5}


def speckle(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random texture with bright and dark blobs: distinct keypoints per image."""
    image = cv2.GaussianBlur(rng.normal(110, 50, (height, width)).astype(np.float32), (0, 0), 3)
    for _ in range(12):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(5, 30)), int(rng.integers(5, 30)))
        cv2.ellipse(image, center, axes, float(rng.integers(0, 180)), 0, 360, float(rng.integers(0, 255)), -1)
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def lesion(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    height, width = shape
    center = (int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 4, 3 * height // 4)))
    cv2.ellipse(mask, center, (int(rng.integers(10, width // 5)), int(rng.integers(8, height // 5))),
                float(rng.integers(0, 180)), 0, 360, 255, -1)
    return mask


def make_busi(base: Path, seed: int = 0) -> Path:
    """Write `<base>/Dataset_BUSI_with_GT/<class>/...` and return that dataset folder."""
    rng = np.random.default_rng(seed)
    root = Path(base) / "Dataset_BUSI_with_GT"
    for label, count in COUNTS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            height, width = int(rng.integers(180, 260)), int(rng.integers(220, 320))
            image = speckle(rng, height, width)
            stem = root / label / f"{label} ({i})"
            if label == "malignant" and i == 2:
                # A crop of benign (1), re-scaled by 0.83 and filed under another class.
                source = np.asarray(Image.open(root / "benign" / "benign (1).png").convert("L"))
                crop = source[10:-10, 15:-5]
                image = cv2.resize(crop, None, fx=0.83, fy=0.83, interpolation=cv2.INTER_AREA)
                height, width = image.shape
            if label == "benign" and i == 3:
                Image.fromarray(np.dstack([image] * 3)).save(f"{stem}.png")  # RGB, as on Kaggle
            elif label == "malignant" and i == 1:
                colour = np.dstack([image] * 3)
                colour[20:60, 20:60] = (200, 30, 30)  # a colour Doppler patch
                Image.fromarray(colour).save(f"{stem}.png")
            else:
                Image.fromarray(image).save(f"{stem}.png")
            mask = lesion(rng, (height, width)) if label != "normal" else np.zeros((height, width), np.uint8)
            Image.fromarray(mask).convert("1").save(f"{stem}_mask.png")  # 1-bit, as the originals
            if label == "benign" and i in (1, 2):
                extra = lesion(rng, (height, width))
                if i == 1:
                    Image.fromarray(extra).save(f"{stem}_mask_1.png")
                else:  # RGBA, as benign (4)_mask_1.png in the real archive
                    rgba = np.dstack([extra, extra, extra, np.full_like(extra, 255)])
                    Image.fromarray(rgba, "RGBA").save(f"{stem}_mask_1.png")
                    Image.fromarray(lesion(rng, (height, width))).save(f"{stem}_mask_2.png")
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` so that its name is the archive's top folder, as the Kaggle download."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


# The folders layout (params: dataset / external.<name>): images/<id>.png, masks/mask_<id>.png and a labels CSV
# with its own column names, extra columns, and a patient column under which some patients have two images.
FOLDERS_DATASET = {"layout": "folders", "images": "images", "masks": "masks", "image_name": "{id}.png",
                   "mask_name": "mask_{id}.png", "labels": "labels.csv", "id_column": "image",
                   "label_column": "diagnosis", "case_column": "patient"}


def make_folders(base: Path, counts: dict[str, int], seed: int = 1, name: str = "mydata") -> Path:
    """Write `<base>/<name>/{images,masks,labels.csv}` and return that folder. Patients have two images each
    where they can (same label, two lesions), so that the split has groups to keep together; normal images have
    no mask file."""
    rng = np.random.default_rng(seed)
    root = Path(base) / name
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,diagnosis,patient,age,scanner"]
    n = 0
    for label, count in counts.items():
        for i in range(count):
            n += 1
            image_id = f"{label[:3]}{i:03d}"
            height, width = int(rng.integers(160, 220)), int(rng.integers(200, 280))
            image = speckle(rng, height, width)
            mask = lesion(rng, (height, width)) if label != "normal" else None
            if mask is not None:
                image[mask > 0] = (image[mask > 0] * 0.3).astype(np.uint8)  # hypoechoic, as a lesion
                Image.fromarray(mask).save(root / "masks" / f"mask_{image_id}.png")
            Image.fromarray(image).save(root / "images" / f"{image_id}.png")
            rows.append(f"{image_id},{label.capitalize()},P{label[:1]}{i // 2:02d},{40 + n},S{n % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
