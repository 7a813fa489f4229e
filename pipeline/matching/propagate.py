"""DIFT's edit propagation, from cache: carry an RGBA sticker drawn on a source image onto a target.

Source pixels under the edit's mask are matched into the target with the exact DIFT protocol (the
source vector of the upsampled map at each pixel, the argmax of cosine over every target pixel; see
`pipeline.matching.protocols`), optionally kept only where the match is a mutual nearest neighbour (matching the
target point back lands near the source point). A homography is fitted to the matches with RANSAC
(threshold a fraction of the target's longer side), falling back to a similarity transform; the
sticker is warped into the target frame with it and alpha-composited over the target image.

A small mask gives few, strongly correlated matches and an ill-conditioned fit, so when its bounding
box is smaller than `context` (default a third) of the source's longer side, the points are sampled
from that square neighbourhood about the box's centre instead (plus the mask).
"""

from __future__ import annotations


import cv2
import numpy as np

from pipeline.errors import PipelineError, size_text
from pipeline.matching.protocols import argmax_points

CHUNK = 64  # queries per cosine batch: (CHUNK, H, W) float32 maps at a time


# ---------------------------------------------------------------------------------------------- files

# ------------------------------------------------------------------------------------------- geometry

def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, 2) points (x, y) through a 3x3 homography."""
    mapped = np.c_[points, np.ones(len(points))] @ np.asarray(matrix, np.float64).T
    return mapped[:, :2] / mapped[:, 2:]


def sample_region(mask: np.ndarray, context: float = 1 / 3) -> np.ndarray:
    """The pixels to match for an edit mask: the mask itself, or, when its bounding box is smaller than
    `context` x the image's longer side, that square about the box's centre (clipped to the image): a
    small edit alone gives few, strongly correlated matches and an ill-conditioned fit."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = context * max(height, width)
    if max(x1 - x0, y1 - y0) >= side:
        return mask
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = np.zeros_like(mask, dtype=bool)
    region[int(max(np.floor(cy - side / 2), 0)): int(min(np.ceil(cy + side / 2), height)),
           int(max(np.floor(cx - side / 2), 0)): int(min(np.ceil(cx + side / 2), width))] = True
    return region | mask


def sample_points(region: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Up to `max_points` distinct integer (x, y) pixels of a boolean region, deterministic in `seed`."""
    ys, xs = np.nonzero(region)
    points = np.stack([xs, ys], axis=1).astype(np.int64)
    if len(points) > max_points:
        chosen = np.random.default_rng(seed).choice(len(points), size=max_points, replace=False)
        points = points[np.sort(chosen)]
    return points


def match_points(source, target, points: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """DIFT matches of source pixels into the target: ((K, 2) target points, (K,) cosine at them)."""
    best = np.zeros((len(points), 2), np.int64)
    score = np.zeros(len(points), np.float64)
    for start in range(0, len(points), chunk):
        part = points[start:start + chunk]
        maps = target.cosine(source.vectors_at(part))
        found = argmax_points(maps)
        best[start:start + chunk] = found
        score[start:start + chunk] = maps[np.arange(len(part)), found[:, 1], found[:, 0]]
    return best, score


def _degenerate(matrix: np.ndarray | None) -> bool:
    if matrix is None or not np.isfinite(matrix).all():
        return True
    linear = matrix[:2, :2] / matrix[2, 2] if abs(matrix[2, 2]) > 1e-12 else matrix[:2, :2]
    det = np.linalg.det(linear)
    # Folded, collapsed or exploded maps are not a plausible edit placement.
    return not (0.05 < det < 20)


def fit_transform(src: np.ndarray, dst: np.ndarray, threshold: float, where: str):
    """A source->target 3x3 matrix from point matches: RANSAC homography, else RANSAC similarity.
    Returns (matrix, inlier mask, method); a one-line PipelineError if neither gives a sane map."""
    src32, dst32 = src.astype(np.float32), dst.astype(np.float32)
    distinct = len(np.unique(dst, axis=0))
    reasons = []
    if len(src) >= 4 and distinct >= 4:
        matrix, inliers = cv2.findHomography(src32, dst32, cv2.RANSAC, threshold, maxIters=2000, confidence=0.995)
        if not _degenerate(matrix) and inliers is not None and inliers.sum() >= 4:
            return matrix / matrix[2, 2], inliers.ravel().astype(bool), "homography"
        reasons.append("no plausible homography")
    else:
        reasons.append(f"{distinct} distinct target points are too few for a homography")
    if len(src) >= 2 and distinct >= 2:
        affine, inliers = cv2.estimateAffinePartial2D(src32, dst32, method=cv2.RANSAC,
                                                      ransacReprojThreshold=threshold, maxIters=2000,
                                                      confidence=0.995)
        matrix = None if affine is None else np.vstack([affine, [0.0, 0.0, 1.0]])
        if not _degenerate(matrix) and inliers is not None and inliers.sum() >= 2:
            return matrix, inliers.ravel().astype(bool), "similarity"
        reasons.append("no plausible similarity")
    else:
        reasons.append(f"{distinct} distinct target point(s) cannot fix a similarity")
    raise PipelineError(where, "edit", f"cannot place the edit: {len(src)} matches, " + "; ".join(reasons))


def composite(target_image: np.ndarray, edit: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The RGBA edit warped by `matrix` and alpha-composited over the target: (composite, warped alpha 0-1)."""
    height, width = target_image.shape[:2]
    alpha = edit[..., 3:4].astype(np.float32) / 255.0
    premultiplied = np.concatenate([edit[..., :3].astype(np.float32) * alpha, alpha], axis=2)
    warped = cv2.warpPerspective(premultiplied, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    colour, coverage = warped[..., :3], np.clip(warped[..., 3:4], 0.0, 1.0)
    out = colour + (1.0 - coverage) * target_image.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), coverage[..., 0]


# ---------------------------------------------------------------------------------------------- main

def propagate(maps, layer: str, timestep: int, src_key: str, trg_key: str, src_image: np.ndarray,
              trg_image: np.ndarray, edit: np.ndarray, max_points: int = 400, seed: int = 0, *,
              mutual: bool = True, reprojection: float = 0.02, context: float = 1 / 3):
    """Propagate an RGBA `edit` (source image coordinates, alpha > 0 = the edit) onto the target image.

    `maps` is a `pipeline.matching.maps.StoreMaps`; `layer`/`timestep` choose the feature map. Returns
    (composite (H_trg, W_trg, 3) uint8, source->target 3x3 homography, info dict)."""
    where = f"{maps.path}: {src_key} -> {trg_key}"
    maps.check_variant(layer, timestep)
    maps.check_images([src_key, trg_key])
    source, target = maps.load(src_key, layer, int(timestep)), maps.load(trg_key, layer, int(timestep))
    for name, image, fmap in (("source", src_image, source), ("target", trg_image, target)):
        if image.ndim != 3 or image.shape[2] != 3:
            raise PipelineError(where, name, f"expected an RGB image, got {image.ndim} dimensions"
                                             f"{'' if image.ndim != 3 else f' with {image.shape[2]} channels'}")
        if image.shape[:2] != (fmap.height, fmap.width):
            raise PipelineError(where, name, f"image is {size_text(image.shape[1], image.shape[0])} but the "
                                             f"store has {size_text(fmap.width, fmap.height)} for it")
    if edit.ndim != 3 or edit.shape[2] != 4 or edit.shape[:2] != src_image.shape[:2]:
        found = (f"{size_text(edit.shape[1], edit.shape[0])} with {edit.shape[2]} channels" if edit.ndim == 3
                 else f"{edit.ndim} dimensions")
        raise PipelineError(where, "edit", f"expected an RGBA edit of the source's size "
                                           f"{size_text(src_image.shape[1], src_image.shape[0])}, got {found}")
    if max_points < 4:
        raise PipelineError(where, "max_points", f"need at least 4 points to fit a homography, got {max_points}")
    mask = edit[..., 3] > 0
    if not mask.any():
        raise PipelineError(where, "edit", "the edit's mask is empty (no pixel with alpha > 0)")

    points = sample_points(sample_region(mask, context), max_points, seed)
    matched, score = match_points(source, target, points)
    keep = np.ones(len(points), bool)
    if mutual:
        # Match each target point back into the source: a reliable match returns to (near) where it
        # started; the tolerance is the fitting threshold measured on the source.
        back, _ = match_points(target, source, matched)
        tolerance = max(reprojection * max(source.width, source.height), 2.0)
        keep = np.hypot(*(back - points).T) <= tolerance
        if not keep.any():
            raise PipelineError(where, "edit", f"no valid matches: none of the {len(points)} sampled edit pixels "
                                               "is a mutual nearest neighbour in the target")
    threshold = reprojection * max(target.width, target.height)
    matrix, inliers, method = fit_transform(points[keep].astype(np.float64), matched[keep].astype(np.float64),
                                            threshold, where)

    out, coverage = composite(trg_image, edit, matrix)
    ys, xs = np.nonzero(mask)
    source_centre = np.array([xs.mean(), ys.mean()])
    centre = apply_homography(matrix, source_centre[None])[0]
    cy, cx = np.nonzero(coverage > 0)
    warped_centre = (np.array([np.average(cx, weights=coverage[cy, cx]), np.average(cy, weights=coverage[cy, cx])])
                     if len(cx) else None)
    info = {
        "layer": layer, "timestep": int(timestep), "points": int(len(points)), "matches": int(keep.sum()),
        "inliers": int(inliers.sum()), "method": method, "threshold": float(threshold),
        "mean_similarity": float(score[keep].mean()),
        "source_centre": source_centre.tolist(), "centre": centre.tolist(),
        "warped_centre": None if warped_centre is None else warped_centre.tolist(),
    }
    return out, matrix, info
