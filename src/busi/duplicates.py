"""Find copies of one scan in BUSI: identical files, re-crops and re-scales, even across classes.

Pipeline: ORB keypoints per image -> shortlist candidate pairs by pooled descriptor votes ->
similarity transform by RANSAC -> pixel-level check of the warped overlap -> union-find groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

WORK_HEIGHT = 320  # every image is resized to this height: bounds the work, keeps tissue detail
N_FEATURES = 600  # ORB keypoints per image; enough for ~30 inliers on a 0.5 re-scale
LSH_TABLES = 8  # hash tables: more tables find more of the near-identical descriptors
LSH_BITS = 18  # sampled bits per hash: near-identical descriptors still collide, random ones rarely do
MAX_BUCKET = 16  # larger buckets hold generic patterns (UI text, flat regions): ignore them
CANDIDATES = 10  # top-voted other images to verify per image
MIN_VOTES = 8  # fewer shared descriptors than this: not worth verifying
RATIO = 0.8  # Lowe ratio test for the pairwise matches
RANSAC_PX = 3.0  # reprojection tolerance at WORK_HEIGHT
MIN_INLIERS = 15  # RANSAC inliers to accept a transform
SCALE_RANGE = (0.3, 3.4)  # plausible relative scale between two copies (working pixels)
MAX_ROTATION_DEG = 3.0  # copies are crops/re-scales, never rotated
MIN_OVERLAP = 0.4  # overlap must cover this fraction of the smaller image
MIN_NCC = 0.8  # normalized cross-correlation over the overlap; different patients stay far below


@dataclass(frozen=True)
class CopyPair:
    a: str
    b: str
    scale: float  # size of b's pixels relative to a's: x_b = scale * x_a + t (original pixels)
    inliers: int
    similarity: float  # NCC of the overlapping pixels


@dataclass
class _Features:
    image: np.ndarray  # grayscale, WORK_HEIGHT high
    factor: float  # working / original size
    points: np.ndarray  # (n, 2) float32 keypoint positions
    descriptors: np.ndarray  # (n, 32) uint8 ORB descriptors


def _features(path: Path) -> _Features:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise OSError(f"cannot read image {path}")
    factor = WORK_HEIGHT / gray.shape[0]
    image = cv2.resize(gray, (max(1, round(gray.shape[1] * factor)), WORK_HEIGHT), interpolation=cv2.INTER_AREA)
    keypoints, descriptors = cv2.ORB_create(nfeatures=N_FEATURES).detectAndCompute(image, None)
    if descriptors is None:
        descriptors = np.zeros((0, 32), np.uint8)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    return _Features(image, factor, points, descriptors)


def _votes(feats: list[_Features]) -> np.ndarray:
    """Count, per image pair, the near-identical descriptors they share (bit-sampling LSH over the pool).

    Each table hashes every descriptor by LSH_BITS random bits; two descriptors of different images in one
    bucket give their images a vote. Crowded buckets (UI text, flat regions) are skipped as uninformative.
    """
    owner = np.concatenate([np.full(len(f.descriptors), i) for i, f in enumerate(feats)])
    bits = np.unpackbits(np.concatenate([f.descriptors for f in feats]), axis=1)
    n = len(feats)
    votes = np.zeros(n * n, np.int64)
    rng = np.random.default_rng(0)
    for _ in range(LSH_TABLES):
        keys = bits[:, rng.choice(bits.shape[1], LSH_BITS, replace=False)] @ (1 << np.arange(LSH_BITS))
        order = np.argsort(keys, kind="stable")
        keys, owners = keys[order], owner[order]
        _, size = np.unique(keys, return_counts=True)
        small = np.repeat(size <= MAX_BUCKET, size)
        for d in range(1, MAX_BUCKET):
            same = (keys[d:] == keys[:-d]) & small[d:]
            a, b = owners[:-d][same], owners[d:][same]
            votes += np.bincount(np.minimum(a, b) * n + np.maximum(a, b), minlength=n * n)
    votes = votes.reshape(n, n)
    np.fill_diagonal(votes, 0)
    return votes + votes.T


def _shortlist(votes: np.ndarray) -> set[tuple[int, int]]:
    """Each image's CANDIDATES most-voted partners (if voted at least MIN_VOTES times)."""
    pairs = set()
    for i, row in enumerate(votes):
        for j in np.argsort(-row)[:CANDIDATES]:
            if row[j] >= MIN_VOTES:
                pairs.add((min(i, j), max(i, j)))
    return pairs


def _verify(fa: _Features, fb: _Features) -> tuple[float, int, float] | None:
    """Return (working scale, inliers, NCC) when b shows the same pixels as a, else None."""
    if len(fa.descriptors) < 2 or len(fb.descriptors) < 2:
        return None
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(fa.descriptors, fb.descriptors, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = fa.points[[m.queryIdx for m in good]]
    dst = fb.points[[m.trainIdx for m in good]]
    matrix, inlier_mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
    if matrix is None or int(inlier_mask.sum()) < MIN_INLIERS:
        return None
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1] or abs(angle) > MAX_ROTATION_DEG:
        return None
    similarity = _overlap_ncc(fa.image, fb.image, matrix)
    if similarity is None or similarity < MIN_NCC:
        return None
    return scale, int(inlier_mask.sum()), similarity


def _overlap_ncc(a: np.ndarray, b: np.ndarray, matrix: np.ndarray) -> float | None:
    """NCC between b and a warped into b's frame, over their overlap (None if the overlap is too small)."""
    size = (b.shape[1], b.shape[0])
    warped = cv2.warpAffine(a, matrix, size, flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.ones_like(a), matrix, size, flags=cv2.INTER_NEAREST)
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8)).astype(bool)  # drop interpolated borders
    scale2 = matrix[0, 0] ** 2 + matrix[1, 0] ** 2
    smaller = min(a.size * scale2, b.size)
    if inside.sum() < MIN_OVERLAP * smaller:
        return None
    x = warped[inside].astype(np.float32)
    y = b[inside].astype(np.float32)
    x -= x.mean()
    y -= y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else 0.0


def find_copy_pairs(paths: Mapping[str, Path]) -> list[CopyPair]:
    """All pairs of images (image_id -> file) that show the same scan, sorted by (a, b)."""
    ids = sorted(paths)
    with Pool(2) as pool:  # PNG decoding dominates; two cores halve it
        feats = pool.map(_features, [paths[i] for i in ids], chunksize=16)
    found = []
    for i, j in sorted(_shortlist(_votes(feats))):
        result = _verify(feats[i], feats[j])
        if result is not None:
            scale, inliers, similarity = result
            original_scale = scale * feats[i].factor / feats[j].factor
            found.append(CopyPair(ids[i], ids[j], round(original_scale, 4), inliers, round(similarity, 4)))
    return found


def copy_groups(ids: Iterable[str], pairs: Iterable[CopyPair]) -> dict[str, str]:
    """Map every id to its group name: the sorted-first id among all its (transitive) copies."""
    parent = {i: i for i in ids}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        ra, rb = root(pair.a), root(pair.b)
        parent[max(ra, rb)] = min(ra, rb)  # the smaller id stays root, so it names the group
    return {i: root(i) for i in parent}
