"""Find copies of one scan in BUSI: identical files, re-crops and re-scales, even across classes; and
consecutive frames of one lesion (the probe moved a little: not a pixel copy, the same patient).

Copies: ORB keypoints per image -> shortlist candidate pairs by pooled descriptor votes -> similarity transform
by RANSAC -> pixel-level check of the warped overlap.
Frames, two ways, either enough (annotators draw the masks of two frames differently, and normal images have none):
- by the whole image: each image's nearest look-alikes (blurred thumbnails) -> RANSAC on all keypoints at the same
  zoom -> the warped overlap's tiles must correlate more than other patients' ever do (less than a copy's);
- by the lesion: lesion shapes compared centred (a cheap prefilter over all pairs of lesion images) -> RANSAC on
  the keypoints around the lesion, at the same zoom -> the lesion masks must agree once mapped.
All pairs -> union-find groups.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

from busi.data.images import read_mask

WORK_HEIGHT = 320  # every image is resized to this height: bounds the work, keeps tissue detail
N_FEATURES = 600  # ORB keypoints per image: BUSI copies keep > 90 RANSAC inliers, 0.5 re-scales included
LSH_TABLES = 8  # hash tables: more tables find more of the near-identical descriptors
LSH_BITS = 18  # sampled bits per hash: near-identical descriptors still collide, random ones rarely do
MAX_BUCKET = 16  # larger buckets hold generic patterns (UI text, flat regions): ignore them
CANDIDATES = 5  # top-voted other images to verify per image: copies rank in the top 3
MIN_VOTES = 30  # shared-descriptor votes to be worth verifying: copies get >100, unrelated pairs ~15
RATIO = 0.8  # Lowe ratio test for the pairwise matches
RANSAC_PX = 3.0  # reprojection tolerance at WORK_HEIGHT
MIN_INLIERS = 10  # RANSAC inliers to accept a transform (the pixel check is the real guard)
SCALE_RANGE = (0.3, 3.4)  # plausible scale between copies in working pixels (heights already equalized)
MAX_ROTATION_DEG = 3.0  # copies are crops/re-scales, never rotated
MIN_OVERLAP = 0.4  # overlap must cover this fraction of the smaller image
TILE = 32  # pixels (at WORK_HEIGHT) per side of the tiles compared by NCC
FLAT_STD = 2.0  # grey-level std below which a tile is flat (black border, anechoic region)
MIN_TILES = 8  # informative tiles needed in the overlap to judge it
MIN_NCC = 0.5  # median tile NCC: copies score >= 0.9, other patients <= 0.2, other frames of one cine between
# Consecutive frames (measured on BUSI: every accepted pair and the rejected ones nearest the thresholds were
# checked by eye, README "Copies of one scan").
FRAME_REGION_PX = 41  # lesion mask dilated by this (working pixels): the keypoints that describe the lesion
FRAME_WINDOW, FRAME_GRID = 192, 48  # prefilter: each mask in a window around its centroid, compared at 48 px
FRAME_MIN_SHAPE_IOU = 0.6  # prefilter: the centred masks overlap this much (frames of one lesion: >= 0.63)
FRAME_SCALE = (0.9, 1.1)  # the same zoom: frames of one lesion 0.92-1.09, other patients' look-alikes <= 0.82
FRAME_MIN_INLIERS = 6  # RANSAC inliers among the keypoints around the lesion
MAX_FRAME_ROTATION_DEG = 5.0  # the probe turned a little
FRAME_MIN_MASK_IOU = 0.6  # lesion masks after the transform: frames of one lesion 0.62-0.93, others <= 0.52
# Frames by the whole image (measured on BUSI, docs/data.md "Copies of one scan": every accepted pair and the
# closest rejected ones were looked at side by side).
THUMBNAIL = (32, 24)  # blurred, normalised thumbnails: frames of one scan are each other's nearest look-alikes
LOOK_ALIKES = 20  # nearest thumbnails verified per image: frames rank in the top 10
FRAME_MIN_WHOLE_INLIERS = 4  # RANSAC inliers over the whole image (the tile NCC is the real guard)
FRAME_MIN_NCC = 0.2  # median tile NCC of the overlap: frames of one scan 0.23-0.85, other patients <= 0.14
STATIC_NCC = 0.9  # a tile this alike at the same screen position in two images is the scanner's, not tissue


@dataclass(frozen=True)
class CopyPair:
    a: str
    b: str
    scale: float  # b's size relative to a's: a pixel x of a shows at scale * x + t in b (original pixels)
    inliers: int
    similarity: float  # a copy, or a frame by the whole image: median tile NCC of the overlap; a frame by the
    # lesion: IoU of the mapped lesion masks
    kind: str = "copy"  # "copy" (the same pixels) or "frame" (another frame of the same lesion)


@dataclass
class _Features:
    image: np.ndarray  # grayscale, WORK_HEIGHT high
    factor: float  # working / original size
    points: np.ndarray  # (n, 2) float32 keypoint positions
    descriptors: np.ndarray  # (n, 32) uint8 ORB descriptors
    thumbnail: np.ndarray  # THUMBNAIL, blurred, zero mean, unit norm: a dot product is a correlation
    lesion: np.ndarray | None = None  # bool, the image's size: its lesion (None: no mask given or no lesion)
    near_lesion: np.ndarray | None = None  # bool per keypoint: within FRAME_REGION_PX of the lesion


def _features(path: Path, mask_paths: tuple[Path, ...] = ()) -> _Features:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise OSError(f"cannot read image {path}")
    factor = WORK_HEIGHT / gray.shape[0]
    width = max(1, round(gray.shape[1] * factor))
    image = cv2.resize(gray, (width, WORK_HEIGHT), interpolation=cv2.INTER_AREA)
    keypoints, descriptors = cv2.ORB_create(nfeatures=N_FEATURES).detectAndCompute(image, None)
    if descriptors is None:
        descriptors = np.zeros((0, 32), np.uint8)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    thumbnail = cv2.resize(cv2.GaussianBlur(image, (0, 0), 4), THUMBNAIL, interpolation=cv2.INTER_AREA).ravel()
    thumbnail = thumbnail.astype(np.float32) - thumbnail.mean()
    features = _Features(image, factor, points, descriptors, thumbnail / max(float(np.linalg.norm(thumbnail)), 1e-6))
    lesion = np.zeros(gray.shape, bool)
    for mask_path in mask_paths:
        lesion |= read_mask(mask_path)  # fetch checked its size
    if lesion.any():
        features.lesion = cv2.resize(lesion.astype(np.uint8), (width, WORK_HEIGHT), interpolation=cv2.INTER_NEAREST) > 0
        region = cv2.dilate(features.lesion.astype(np.uint8), np.ones((FRAME_REGION_PX,) * 2, np.uint8)) > 0
        x = np.clip(points[:, 0].astype(int), 0, width - 1)
        y = np.clip(points[:, 1].astype(int), 0, WORK_HEIGHT - 1)
        features.near_lesion = region[y, x]
    return features


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


def _similarity_transform(fa: _Features, fb: _Features) -> tuple[np.ndarray, int] | None:
    """RANSAC crop+scale transform (2x3, working pixels) mapping a onto b and its inlier count, or None."""
    fit = _fit(fa.points, fa.descriptors, fb.points, fb.descriptors, MIN_INLIERS, SCALE_RANGE, MAX_ROTATION_DEG)
    return None if fit is None else fit[:2]


def _fit(points_a, descriptors_a, points_b, descriptors_b, min_inliers: int, scale_range: tuple[float, float],
         max_rotation_deg: float) -> tuple[np.ndarray, int, float] | None:
    """Ratio-tested keypoint matches, then a RANSAC similarity transform (2x3, working pixels) from a to b within
    the scale range and rotation: (matrix, inliers, scale), or None."""
    if len(descriptors_a) < 2 or len(descriptors_b) < 2:
        return None
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors_a, descriptors_b, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < min_inliers:
        return None
    src = points_a[[m.queryIdx for m in good]]
    dst = points_b[[m.trainIdx for m in good]]
    matrix, inlier_mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
    if matrix is None or int(inlier_mask.sum()) < min_inliers:
        return None
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    if not scale_range[0] <= scale <= scale_range[1] or abs(angle) > max_rotation_deg:
        return None
    return matrix, int(inlier_mask.sum()), scale


def _tile_ncc(a: np.ndarray, b: np.ndarray, matrix: np.ndarray, ignore_static: bool = False) -> float | None:
    """Median NCC over TILE-pixel tiles of b and a warped into b's frame (None: overlap too small).

    Local tiles, not one global NCC: the bright skin line, dark acoustic shadow and black screen border that
    every scan shares inflate a global NCC between different patients; tiles only agree if the speckle does.
    `ignore_static`: leave out the tiles that are the same at the same place on the screen in both images (the
    scanner's text, ruler and markers): two frames differ there only where the tissue is.
    """
    size = (b.shape[1], b.shape[0])
    warped = cv2.warpAffine(a, matrix, size, flags=cv2.INTER_LINEAR).astype(np.float32)
    inside = cv2.warpAffine(np.ones_like(a), matrix, size, flags=cv2.INTER_NEAREST)
    area_a = a.size * (matrix[0, 0] ** 2 + matrix[1, 0] ** 2)
    if inside.sum() < MIN_OVERLAP * min(area_a, b.size):
        return None
    rows, cols = b.shape[0] // TILE, b.shape[1] // TILE

    def tiles(image: np.ndarray) -> np.ndarray:  # (n_tiles, TILE * TILE)
        blocks = image[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE)
        return blocks.swapaxes(1, 2).reshape(rows * cols, -1)

    def ncc(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # per tile, and which tiles have texture
        x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        sx, sy = np.sqrt((x * x).sum(1)), np.sqrt((y * y).sum(1))
        flat = TILE * FLAT_STD  # tiles this flat (black border, anechoic) carry no evidence either way
        textured = (sx > flat) & (sy > flat)
        return np.where(textured, (x * y).sum(1) / np.maximum(sx * sy, 1e-9), 0.0), textured

    correlation, textured = ncc(tiles(warped), tiles(b.astype(np.float32)))
    usable = tiles(inside).all(1) & textured
    if ignore_static:
        unmoved = np.zeros(b.shape, np.float32)  # a at the same screen position, cut or padded to b's size
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        unmoved[:h, :w] = a[:h, :w]
        same_place, _ = ncc(tiles(unmoved), tiles(b.astype(np.float32)))
        usable &= same_place < STATIC_NCC
    if usable.sum() < MIN_TILES:
        return None
    return float(np.median(correlation[usable]))


def find_copy_pairs(paths: Mapping[str, Path], masks: Mapping[str, tuple[Path, ...]] | None = None) -> list[CopyPair]:
    """All pairs of images (image_id -> file) that show the same scan, sorted by (a, b); with the images' lesion
    mask files (`masks`), also the pairs that are consecutive frames of one lesion (kind "frame")."""
    ids = sorted(paths)
    if len(ids) < 2:
        return []
    # PNG decoding dominates; two cores halve it. The workers take SIGTERM's default: the pool ends them with it,
    # which the command's own handler (Ctrl-C semantics, busi.cli) would print as a traceback in each.
    with Pool(2, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        feats = pool.starmap(_features, [(paths[i], tuple((masks or {}).get(i, ()))) for i in ids], chunksize=16)
    found = []
    for i, j in sorted(_shortlist(_votes(feats))):
        fit = _similarity_transform(feats[i], feats[j])
        if fit is None:
            continue
        matrix, inliers = fit
        similarity = _tile_ncc(feats[i].image, feats[j].image, matrix)
        if similarity is not None and similarity >= MIN_NCC:
            working_scale = math.hypot(matrix[0, 0], matrix[1, 0])
            scale = working_scale * feats[i].factor / feats[j].factor  # in original pixels
            found.append(CopyPair(ids[i], ids[j], round(scale, 4), inliers, round(similarity, 4)))
    for frames, evidence in ((_look_alikes(feats), _whole_frame), (_same_shape(feats), _frame)):
        known = {(pair.a, pair.b) for pair in found}
        for i, j in frames:
            if (ids[i], ids[j]) not in known and (frame := evidence(feats[i], feats[j])) is not None:
                scale, inliers, similarity = frame
                found.append(CopyPair(ids[i], ids[j], round(scale * feats[i].factor / feats[j].factor, 4), inliers,
                                      round(similarity, 4), kind="frame"))
    return sorted(found, key=lambda pair: (pair.a, pair.b))


def _look_alikes(feats: list[_Features]) -> list[tuple[int, int]]:
    """Each image with its LOOK_ALIKES most correlated thumbnails (i < j)."""
    thumbnails = np.array([f.thumbnail for f in feats])
    correlation = thumbnails @ thumbnails.T
    np.fill_diagonal(correlation, -np.inf)
    nearest = np.argsort(-correlation, axis=1)[:, : min(LOOK_ALIKES, len(feats) - 1)]  # itself sorts last
    return sorted({(min(i, int(j)), max(i, int(j))) for i, row in enumerate(nearest) for j in row})


def _whole_frame(fa: _Features, fb: _Features) -> tuple[float, int, float] | None:
    """(working scale, inliers, tile NCC) when b is another frame of a's scan: all keypoints fit one transform at
    the same zoom, and the overlap's tiles correlate as only one patient's tissue does (masks are not needed)."""
    fit = _fit(fa.points, fa.descriptors, fb.points, fb.descriptors, FRAME_MIN_WHOLE_INLIERS, FRAME_SCALE,
               MAX_FRAME_ROTATION_DEG)
    if fit is None:
        return None
    matrix, inliers, scale = fit
    similarity = _tile_ncc(fa.image, fb.image, matrix, ignore_static=True)
    return (scale, inliers, similarity) if similarity is not None and similarity >= FRAME_MIN_NCC else None


def _same_shape(feats: list[_Features]) -> list[tuple[int, int]]:
    """Pairs of lesion images whose masks, each centred on its centroid, overlap by FRAME_MIN_SHAPE_IOU."""
    lesions = [i for i, f in enumerate(feats) if f.lesion is not None]
    if len(lesions) < 2:
        return []
    shapes = np.array([_centred(feats[i].lesion) for i in lesions]).reshape(len(lesions), -1)
    inter = shapes @ shapes.T
    area = shapes.sum(1)
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    return [(lesions[x], lesions[y]) for x, y in zip(*np.nonzero(np.triu(iou >= FRAME_MIN_SHAPE_IOU, 1)), strict=True)]


def _centred(lesion: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(lesion)
    half = FRAME_WINDOW // 2
    window = np.pad(lesion, half)[int(ys.mean()) : int(ys.mean()) + FRAME_WINDOW,
                                  int(xs.mean()) : int(xs.mean()) + FRAME_WINDOW]
    return cv2.resize(window.astype(np.float32), (FRAME_GRID, FRAME_GRID), interpolation=cv2.INTER_AREA)


def _frame(fa: _Features, fb: _Features) -> tuple[float, int, float] | None:
    """(working scale, inliers, mask IoU) when b is another frame of a's lesion: the keypoints around both lesions
    fit one transform at the same zoom, and it maps a's lesion mask onto b's."""
    fit = _fit(fa.points[fa.near_lesion], fa.descriptors[fa.near_lesion], fb.points[fb.near_lesion],
               fb.descriptors[fb.near_lesion], FRAME_MIN_INLIERS, FRAME_SCALE, MAX_FRAME_ROTATION_DEG)
    if fit is None:
        return None
    matrix, inliers, scale = fit
    size = (fb.lesion.shape[1], fb.lesion.shape[0])
    mapped = cv2.warpAffine(fa.lesion.astype(np.uint8), matrix, size, flags=cv2.INTER_NEAREST) > 0
    mask_iou = (mapped & fb.lesion).sum() / max(1, (mapped | fb.lesion).sum())
    return (scale, inliers, float(mask_iou)) if mask_iou >= FRAME_MIN_MASK_IOU else None


def copy_groups(ids: Iterable[str], pairs: Iterable[CopyPair | tuple[str, str]]) -> dict[str, str]:
    """Map every id to its group name: the sorted-first id among all its (transitive) copies; `pairs` are
    CopyPairs or any other links of two ids (the images of one patient)."""
    parent = {i: i for i in ids}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        ra, rb = (root(pair.a), root(pair.b)) if isinstance(pair, CopyPair) else (root(pair[0]), root(pair[1]))
        parent[max(ra, rb)] = min(ra, rb)  # the smaller id stays root, so it names the group
    return {i: root(i) for i in parent}
