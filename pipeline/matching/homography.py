"""DIFT's HPatches homography protocol as pure functions (no store access), exact to their code:
Tsingularity/dift @ 9421eb2034396c5b66f1aff37f03e540c264e52f, `eval_hpatches.py` (descriptors) and
`eval_homography.py` (matching, homography, corner error).

- Descriptors (`sample_descriptors`): the image is squashed to the canvas (768 x 768) and its feature map
  (1, C, h, w) sampled at the keypoints (x, y in ORIGINAL pixels) by
  `F.grid_sample(ft, ((coord - c) / c).unsqueeze(2))` with c = ((W - 1) / 2, (H - 1) / 2) of the original
  size and grid_sample's defaults (bilinear, zeros padding, align_corners=False). Note the mismatch:
  normalising by (W - 1) / 2 puts pixel 0 at -1 and pixel W - 1 at +1, which align_corners=False reads as
  the outer EDGES of the map, not the centres of its edge cells (the pixel-centre rule would be
  (x + 0.5) / W * 2 - 1). So x lands at map column ((x - c) / c + 1) * w / 2 - 0.5: up to half a cell off,
  and an image corner blends 1/2 (per axis) of zero padding. It is part of their protocol, kept on purpose:
  "fixing" it would change the published numbers.
- Matching (`match_pair`): each image's keypoints made unique (`np.unique(..., return_index=True, axis=0)`,
  sorted, descriptors reindexed), mutual nearest neighbours on float32 torch (cosine or negated squared L2;
  `torch.max` first-index argmax), `cv2.findHomography(pts_a, pts_b, LMEDS | RANSAC,
  ransacReprojThreshold=3)` on float32 points; the error is the mean over image 1's four corners
  (original w, h) of the distance between the corners warped by the truth and by the estimate.
- Where DIFT would crash (findHomography returns None, or fewer than 4 matches, which cv2 refuses) the
  pair counts as a failure: corner error inf, `homography_found` False.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

METHODS = {"lmeds": cv2.LMEDS, "ransac": cv2.RANSAC}
METRICS = ("cosine", "l2")


def sample_descriptors(features: np.ndarray, keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, C) float32 descriptors at `keypoints` (N, 2; x, y in the original width x height image) from the
    (h, w, C) map of the whole image squashed to the canvas, exactly as eval_hpatches.py samples them
    (the (W - 1) / 2 normalisation with align_corners=False is theirs; see the module docstring)."""
    ft = torch.from_numpy(np.asarray(features, dtype=np.float32)).permute(2, 0, 1)[None]
    coord = torch.from_numpy(np.asarray(keypoints, dtype=np.float32).reshape(1, -1, 2))
    if coord.shape[1] == 0:
        return np.zeros((0, ft.shape[1]), np.float32)
    c = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0], dtype=torch.float32)
    grid = ((coord - c) / c).unsqueeze(2)  # (1, N, 1, 2)
    out = F.grid_sample(ft, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(-1).transpose(1, 2)[0].numpy()


def unique_keypoints(keypoints: np.ndarray, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keypoints with the descriptor of each one's first occurrence, as eval_homography.py
    does: the matcher then sees no duplicate point twice."""
    keypoints, index = np.unique(keypoints, return_index=True, axis=0)
    return keypoints, np.asarray(descriptors)[index]


def mutual_nearest(a: np.ndarray, b: np.ndarray, metric: Literal["cosine", "l2"] = "cosine") -> np.ndarray:
    """(M, 2) index pairs (i in a, j in b) that are each other's nearest neighbour: DIFT's `mnn_matcher`,
    on float32 torch tensors, ties going to the first index as torch.max gives them."""
    if metric not in METRICS:
        raise PipelineError(None, "metric", f"{metric!r} is not one of {list(METRICS)}")
    a = torch.from_numpy(np.asarray(a, dtype=np.float32))
    b = torch.from_numpy(np.asarray(b, dtype=np.float32))
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    if metric == "cosine":
        sim = F.normalize(a) @ F.normalize(b).t()
    else:
        sim = -(torch.sum(a ** 2, dim=1, keepdim=True) + torch.sum(b ** 2, dim=1, keepdim=True).t() - 2 * a.mm(b.t()))
    nn12 = torch.max(sim, dim=1)[1]
    nn21 = torch.max(sim, dim=0)[1]
    ids1 = torch.arange(0, sim.shape[0])
    mask = ids1 == nn21[nn12]
    return torch.stack([ids1[mask], nn12[mask]]).t().numpy()


def _find_homography(points_a: np.ndarray, points_b: np.ndarray, method: str,
                     threshold: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(H, inlier mask) from cv2.findHomography as DIFT calls it, or (None, None) below 4 matches (cv2
    raises there; DIFT would crash)."""
    if method not in METHODS:
        raise PipelineError(None, "method", f"{method!r} is not one of {list(METHODS)}")
    points_a = np.asarray(points_a).reshape(-1, 1, 2).astype(np.float32)
    points_b = np.asarray(points_b).reshape(-1, 1, 2).astype(np.float32)
    if len(points_a) < 4:
        return None, None
    H, mask = cv2.findHomography(points_a, points_b, METHODS[method], ransacReprojThreshold=threshold)
    return (None, None) if H is None else (H, mask)


def estimate_homography(points_a: np.ndarray, points_b: np.ndarray, method: Literal["lmeds", "ransac"] = "lmeds",
                        threshold: float = 3.0) -> np.ndarray | None:
    """The 3 x 3 homography mapping points_a onto points_b (LMEDS ignores `threshold`), or None."""
    return _find_homography(points_a, points_b, method, threshold)[0]


def corner_error(estimate: np.ndarray | None, truth: np.ndarray, width: int, height: int) -> float:
    """Mean distance over the image's 4 corners (original width, height) between the corners warped by
    `truth` and by `estimate`; inf without an estimate (a failure at every threshold)."""
    if estimate is None:
        return float("inf")
    corners = np.array([[0, 0, 1], [0, height - 1, 1], [width - 1, 0, 1], [width - 1, height - 1, 1]])
    real = np.dot(corners, np.transpose(truth))
    real = real[:, :2] / real[:, 2:]
    warped = np.dot(corners, np.transpose(estimate))
    warped = warped[:, :2] / warped[:, 2:]
    return float(np.mean(np.linalg.norm(real - warped, axis=1)))


def match_pair(desc_a: np.ndarray, kp_a: np.ndarray, desc_b: np.ndarray, kp_b: np.ndarray, truth: np.ndarray,
               width: int, height: int, metric: Literal["cosine", "l2"] = "cosine",
               method: Literal["lmeds", "ransac"] = "lmeds", threshold: float = 3.0) -> dict:
    """One HPatches pair (image 1 -> image k) as eval_homography.py scores it; width, height are image 1's.
    `matches` index the unique (sorted) keypoints returned alongside."""
    kp_a, desc_a = unique_keypoints(kp_a, desc_a)
    kp_b, desc_b = unique_keypoints(kp_b, desc_b)
    matches = mutual_nearest(desc_a, desc_b, metric)
    H, mask = _find_homography(kp_a[matches[:, 0]], kp_b[matches[:, 1]], method, threshold)
    return {"keypoints_a": kp_a, "keypoints_b": kp_b, "matches": matches,
            "inliers": 0 if mask is None else int(mask.sum()),
            "corner_error": corner_error(H, truth, width, height), "homography_found": H is not None,
            "estimate": None if H is None else [float(v) for v in H.ravel()]}
