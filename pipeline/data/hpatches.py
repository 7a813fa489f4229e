"""HPatches sequences on disk -> an images table, homography pairs and DIFT's keypoint files.

Layout (the release's own, also written by `pipeline.demo.hpatches`), under `hpatches-sequences-release`:
    <seq>/1.ppm .. <seq>/6.ppm, <seq>/H_1_2 .. <seq>/H_1_6
`<seq>` starts with `i_` (illumination: one viewpoint, light changes) or `v_` (viewpoint: a planar scene seen
from six places). `H_1_k` is a 3x3 text matrix mapping image-1 pixels to image-k pixels, x_k ~ H @ [x1, y1, 1].
Images are keyed by `"<seq>/<k>"`. DIFT (eval_hpatches.py) samples its features at keypoints read from
`<seq>-<k>.kp` files (one `x y` row each, pixels of the original image) and evaluates on d2-net's copy of the
release, without the eight high-resolution sequences of D2NET_EXCLUDED.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import D2NET_EXCLUDED
from pipeline.data.images import image_size
from pipeline.errors import PipelineError, size_text

INDICES = range(1, 7)  # image 1 is the reference of every pair; 2..6 are its targets


@dataclass(frozen=True)
class Pair:
    """Image 1 of `sequence` against image `target` (2..6), with the ground truth mapping 1 -> target."""

    sequence: str
    target: int
    homography: np.ndarray  # (3, 3) float64

    @property
    def kind(self) -> str:
        """"i" (illumination) or "v" (viewpoint): HPatches reports the two apart."""
        return self.sequence[0]


def sequences(root: str | Path, exclude: tuple[str, ...] | list[str] = D2NET_EXCLUDED) -> list[str]:
    """Sorted sequence folders under `root` (`i_*`, `v_*`; anything else, e.g. a README, is ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(root, None, "no HPatches sequences here (expected <seq>/1.ppm ...)")
    skip = set(exclude)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(("i_", "v_")))
    kept = [name for name in found if name not in skip]
    if not kept:
        raise PipelineError(root, None, f"no HPatches sequences here ({len(found)} i_*/v_* folders, all left out by "
                                        "exclude)" if found else "no HPatches sequences here (expected "
                                        "hpatches-sequences-release/<seq>/1.ppm ...)")
    return kept


def images_table(root: str | Path, exclude: tuple[str, ...] | list[str] = D2NET_EXCLUDED) -> pd.DataFrame:
    """A row per image: key, path relative to `root`, sequence, and its original (W, H), read off the file
    so that a truncated image fails here rather than mid-extraction."""
    root = Path(root)
    rows = []
    for seq in sequences(root, exclude):
        for k in INDICES:
            path = Path(seq) / f"{k}.ppm"
            if not (root / path).is_file():
                raise PipelineError(root / path, None, "missing image (every sequence has 1.ppm .. 6.ppm)")
            width, height = image_size(root / path)
            rows.append({"image": f"{seq}/{k}", "path": path.as_posix(), "category": seq,
                         "width": int(width), "height": int(height)})
    return pd.DataFrame(rows, columns=["image", "path", "category", "width", "height"])


def read_homography(path: str | Path) -> np.ndarray:
    """A ground-truth `H_1_k` file as a (3, 3) float64 matrix; anything that cannot map points is refused."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(path, None, "missing ground-truth homography") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(path, None, f"malformed homography: unreadable ({exc})") from None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if [len(row) for row in rows] != [3, 3, 3]:
        count = sum(len(row) for row in rows)
        raise PipelineError(path, None, f"malformed homography: expected 3 rows of 3 numbers, found {len(rows)} "
                                        f"row(s), {count} value(s)")
    try:
        matrix = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise PipelineError(path, None, f"malformed homography: {exc}") from None
    if not np.isfinite(matrix).all():
        raise PipelineError(path, None, "malformed homography: a value is not finite")
    if matrix[2, 2] == 0:
        raise PipelineError(path, None, "malformed homography: last element is 0 (not a normalised homography)")
    if abs(np.linalg.det(matrix / matrix[2, 2])) < 1e-12:
        raise PipelineError(path, None, "malformed homography: singular matrix")
    return matrix


def pairs(root: str | Path, exclude: tuple[str, ...] | list[str] = D2NET_EXCLUDED) -> list[Pair]:
    """Five pairs per sequence, image 1 against 2..6, as HPatches' homography benchmark has them."""
    root = Path(root)
    return [Pair(seq, k, read_homography(root / seq / f"H_1_{k}"))
            for seq in sequences(root, exclude) for k in INDICES[1:]]


def keypoint_file(folder: str | Path, image_key: str) -> Path:
    """DIFT's keypoint file of image `"<seq>/<k>"`: `<folder>/<seq>-<k>.kp`."""
    seq, k = image_key.split("/")
    return Path(folder) / f"{seq}-{k}.kp"


def read_keypoints(path: str | Path, width: int, height: int) -> np.ndarray:
    """(N, 2) float64 (x, y) keypoints of a `.kp` file, each checked to lie in the (W, H) image: DIFT samples
    its feature map with grid_sample on coordinates normalised by (W-1)/2, (H-1)/2, so a point beyond the
    pixel centres at the edges reads padding, not features."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(path, None, "missing keypoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: no keypoints, said by the caller
            points = np.loadtxt(path, dtype=np.float64, ndmin=2)  # ndmin: a single keypoint stays (1, 2)
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        if "columns changed" in reason:
            raise PipelineError(path, None, f"keypoint file must have 2 columns (x y); {reason}") from None
        raise PipelineError(path, None, f"unreadable keypoint file ({reason})") from None
    if points.size == 0:
        return np.zeros((0, 2), np.float64)
    if points.shape[1] != 2:
        raise PipelineError(path, None, f"keypoint file must have 2 columns (x y), found {points.shape[1]}")
    bad = np.flatnonzero(~np.isfinite(points).all(1))
    if bad.size:
        raise PipelineError(path, None, f"keypoint {bad[0]} is not finite ({points[bad[0]].tolist()})")
    x, y = points[:, 0], points[:, 1]
    outside = np.flatnonzero((x < 0) | (x > width - 1) | (y < 0) | (y > height - 1))
    if outside.size:
        i = int(outside[0])
        raise PipelineError(path, None, f"keypoint {i} at ({x[i]:g}, {y[i]:g}) is outside the "
                                        f"{size_text(width, height)} image")
    return points
