import hashlib
import zipfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi.data.copies import CopyPair, _features, _frame, copy_groups, find_copy_pairs
from conftest import REAL_ARCHIVE


def scan(seed: int, shape: tuple[int, int] = (300, 400)) -> np.ndarray:
    """A fake ultrasound frame: smooth multi-scale texture, a few dark ellipses, speckle."""
    rng = np.random.default_rng(seed)
    h, w = shape
    image = np.zeros(shape, np.float32)
    for sigma, weight in [(12, 60), (4, 35), (1.5, 20)]:
        noise = rng.standard_normal(shape).astype(np.float32)
        image += weight * sigma * cv2.GaussianBlur(noise, (0, 0), sigma)
    for _ in range(4):
        center = (int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40)))
        axes = (int(rng.integers(10, 45)), int(rng.integers(8, 30)))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, -80, -1)
    image *= rng.gamma(8, 1 / 8, shape).astype(np.float32)  # multiplicative speckle
    return np.clip(image + 110, 0, 255).astype(np.uint8)


def with_overlay(image: np.ndarray) -> np.ndarray:
    """Frame the scan in a black screen with the UI text, depth ruler and calipers one scanner burns in."""
    out = cv2.copyMakeBorder(image, 40, 10, 60, 60, cv2.BORDER_CONSTANT, value=0)
    cv2.putText(out, "GE LOGIQ 5cm 12L", (8, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2)
    cv2.putText(out, "BREAST R", (8, 70), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)
    for y in range(60, out.shape[0] - 10, 20):  # depth ruler beside the scan
        cv2.line(out, (out.shape[1] - 40, y), (out.shape[1] - 25, y), 255, 2)
    for x, y in [(120, 250), (180, 260)]:
        cv2.drawMarker(out, (x, y), 255, cv2.MARKER_CROSS, 12, 2)
    return out


def crop_rescale(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape
    crop = image[int(0.05 * h) : int(0.95 * h), int(0.08 * w) : int(0.97 * w)]
    size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
    return cv2.resize(crop, size, interpolation=cv2.INTER_AREA)


def write(tmp_path: Path, images: dict[str, np.ndarray]) -> dict[str, Path]:
    paths = {}
    for image_id, image in images.items():
        paths[image_id] = tmp_path / f"{image_id}.png"
        cv2.imwrite(str(paths[image_id]), image)
    return paths


def paired(pairs: list[CopyPair]) -> set[tuple[str, str]]:
    return {(p.a, p.b) for p in pairs}


def test_exact_copy_and_rescaled_crops_are_found(tmp_path):
    original = scan(1)
    images = {
        "benign (1)": original,
        "benign (2)": original.copy(),
        "benign (3)": crop_rescale(original, 0.83),
        "malignant (4)": crop_rescale(original, 0.5),
        "normal (5)": scan(2),
    }
    pairs = find_copy_pairs(write(tmp_path, images))
    found = paired(pairs)
    for other in ["benign (2)", "benign (3)", "malignant (4)"]:
        assert ("benign (1)", other) in found
    assert not any("normal (5)" in pair for pair in found)
    by_pair = {(p.a, p.b): p for p in pairs}
    assert by_pair[("benign (1)", "benign (2)")].similarity > 0.99
    assert by_pair[("benign (1)", "malignant (4)")].scale == pytest.approx(0.5, abs=0.03)
    assert by_pair[("benign (1)", "benign (3)")].scale == pytest.approx(0.83, abs=0.03)


def test_grayscale_and_rgb_copies_are_found(tmp_path):
    gray = scan(3)
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    rgb[100:140, 150:200] = (0, 0, 255)  # a small colour Doppler box
    found = paired(find_copy_pairs(write(tmp_path, {"benign (1)": gray, "benign (2)": rgb})))
    assert found == {("benign (1)", "benign (2)")}


def test_different_scans_with_shared_overlay_are_not_paired(tmp_path):
    images = {f"benign ({seed})": with_overlay(scan(seed)) for seed in (10, 11, 12)}
    assert find_copy_pairs(write(tmp_path, images)) == []


def frame(tissue_seed: int, frame_seed: int, shift: tuple[int, int], shape=(300, 400)) -> tuple[np.ndarray, np.ndarray]:
    """One frame of a cine: a view of a patient's tissue (coarse texture with a dark elliptic lesion) moved by
    `shift` pixels, with its own fine texture and speckle (so the pixels are no copy); and its lesion mask."""
    rng = np.random.default_rng(tissue_seed)
    h, w = shape
    margin = 30
    big = (h + 2 * margin, w + 2 * margin)
    tissue = np.zeros(big, np.float32)
    for sigma, weight in [(12, 60), (4, 35), (2, 25)]:
        tissue += weight * sigma * cv2.GaussianBlur(rng.standard_normal(big).astype(np.float32), (0, 0), sigma)
    mask = np.zeros(big, np.uint8)
    cv2.ellipse(mask, (200 + margin, 150 + margin), (45, 28), 15, 0, 360, 255, -1)  # the same lesion shape for all
    tissue[mask > 0] -= 90
    dx, dy = shift
    view = tissue[margin + dy : margin + dy + h, margin + dx : margin + dx + w]
    own = np.random.default_rng(frame_seed)
    view = view + 50 * cv2.GaussianBlur(own.standard_normal(shape).astype(np.float32), (0, 0), 1.0)
    view = view * own.gamma(3, 1 / 3, shape).astype(np.float32)
    window = (slice(margin + dy, margin + dy + h), slice(margin + dx, margin + dx + w))
    return np.clip(view + 110, 0, 255).astype(np.uint8), mask[window]


def test_consecutive_frames_are_paired_by_the_whole_image_and_look_alikes_are_not(tmp_path):
    """Frames of one scan are paired whether or not the annotators' masks agree, and normal frames (no mask) too;
    other patients' scans with the same lesion shape are not."""
    frames = {"benign (1)": frame(1, 10, (0, 0)), "malignant (2)": frame(1, 11, (14, 6)),  # one patient, two frames
              "benign (3)": frame(2, 12, (0, 0)), "benign (4)": frame(3, 13, (14, 6)),  # same lesion shape, others
              "benign (5)": frame(4, 14, (0, 0)), "benign (6)": frame(4, 15, (-10, 8)),  # masks drawn differently
              "normal (7)": frame(5, 16, (0, 0)), "normal (8)": frame(5, 17, (8, -6))}  # normal: no masks
    masks = {image_id: mask for image_id, (_, mask) in frames.items() if not image_id.startswith("normal")}
    masks["benign (6)"] = np.zeros_like(masks["benign (6)"])
    cv2.ellipse(masks["benign (6)"], (120, 90), (30, 40), 80, 0, 360, 255, -1)  # another outline, elsewhere
    paths = write(tmp_path, {image_id: image for image_id, (image, _) in frames.items()})
    (tmp_path / "masks").mkdir()
    mask_files = {image_id: (path,) for image_id, path in write(tmp_path / "masks", masks).items()}
    pairs = find_copy_pairs(paths, mask_files)
    assert [(p.a, p.b, p.kind) for p in pairs] == [("benign (1)", "malignant (2)", "frame"),  # across classes too
                                                   ("benign (5)", "benign (6)", "frame"),
                                                   ("normal (7)", "normal (8)", "frame")]
    assert all(p.scale == pytest.approx(1.0, abs=0.03) and p.similarity >= 0.2 for p in pairs)  # tiles correlate
    assert [(p.a, p.b) for p in find_copy_pairs(paths)] == [(p.a, p.b) for p in pairs]  # masks are not needed
    # The lesion route on its own: it pairs the frames whose masks agree, and alone it would miss (5, 6).
    features = {image_id: _features(paths[image_id], mask_files[image_id]) for image_id in masks}
    assert _frame(features["benign (1)"], features["malignant (2)"])[2] > 0.9  # the masks agree once mapped
    assert _frame(features["benign (5)"], features["benign (6)"]) is None


def test_copy_groups_are_transitive_and_named_by_the_first_id():
    pairs = [
        CopyPair("malignant (7)", "benign (9)", 1.0, 50, 0.99),
        CopyPair("benign (9)", "benign (10)", 0.5, 30, 0.9),
    ]
    ids = ["benign (9)", "benign (10)", "malignant (7)", "normal (1)", "normal (2)"]
    groups = copy_groups(ids, pairs)
    assert groups == {
        "benign (9)": "benign (10)",
        "benign (10)": "benign (10)",
        "malignant (7)": "benign (10)",
        "normal (1)": "normal (1)",
        "normal (2)": "normal (2)",
    }


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason=f"BUSI archive not found at {REAL_ARCHIVE} (set BUSI_ARCHIVE)")
def test_identical_files_in_real_archive_share_a_group(tmp_path):
    with zipfile.ZipFile(REAL_ARCHIVE) as archive:
        members = [m for m in archive.namelist() if m.endswith(".png") and "_mask" not in m]
        archive.extractall(tmp_path, members)
    paths = {Path(m).stem: tmp_path / m for m in members}
    assert len(paths) == 780
    by_hash = defaultdict(list)
    for image_id, path in paths.items():
        by_hash[hashlib.sha256(path.read_bytes()).hexdigest()].append(image_id)
    identical = [ids for ids in by_hash.values() if len(ids) > 1]
    assert identical, "the archive is known to hold byte-identical images"
    groups = copy_groups(paths, find_copy_pairs(paths))
    for ids in identical:
        assert len({groups[i] for i in ids}) == 1, ids
