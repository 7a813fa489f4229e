"""Keypoint matching from cached feature maps.

`dift` is DIFT's SPair evaluation, exactly: both maps bilinearly upsampled (align_corners=False) to
their image's original (H, W); the source vector read at the keypoint; the prediction is the argmax
of cosine similarity over every target pixel. It never materialises an upsampled map: the dot
product is linear in the interpolated target, so the upsampled dot map is the interpolation of the
feature-resolution dot map, and the squared norm of an interpolated vector is a fixed combination of
dot products between its <= 4 neighbouring cells, precomputed once per target map.

`fast` searches the L2-normalised target cells with FAISS (IndexFlatIP, one index per target image,
shared by all pairs that use it), then refines the top-k candidate cells at image resolution with the
same exact cosine.

Geometry: a map of (h, w) cells with `stride` canvas pixels per cell; the image occupies the canvas
region [0, valid_x1) x [0, valid_y1) (the whole canvas in `squash` mode). Image pixel X maps to the
continuous cell coordinate u = (X + 0.5) * (valid_x1 / stride) / W - 0.5, which for `squash` is
exactly PyTorch's align_corners=False rule. Only the valid region of the target is ever searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class Axis:
    """Bilinear weights along one axis: output pixel n blends cells i0[n] and i0[n] + 1."""

    i0: np.ndarray
    a0: np.ndarray
    a1: np.ndarray

    def matrix(self, cells: int) -> np.ndarray:
        """The dense (pixels, cells) interpolation matrix."""
        m = np.zeros((len(self.i0), cells + 1))
        rows = np.arange(len(self.i0))
        m[rows, self.i0] += self.a0
        m[rows, self.i0 + 1] += self.a1
        return m[:, :cells]


def axis_weights(pixels: int, cells: int, covered: float) -> Axis:
    """Weights for `pixels` output pixels over `cells` cells, of which `covered` (fractional) hold the image."""
    u = (np.arange(pixels) + 0.5) * (covered / pixels) - 0.5
    u = np.maximum(u, 0.0)  # PyTorch clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(u).astype(np.int64), cells - 1)
    a1 = np.where(i0 < cells - 1, u - i0, 0.0)  # on the last cell both taps are that cell
    return Axis(i0=i0, a0=1.0 - a1, a1=a1)


@dataclass
class FeatureMap:
    """One image's (h, w, C) map and how it lies over the image's original (H, W) pixels."""

    features: np.ndarray  # (h, w, C) float32
    width: int
    height: int
    valid_x1: float  # canvas pixels covered by the image
    valid_y1: float
    stride: float

    def __post_init__(self):
        h, w, _ = self.features.shape
        self.rows = axis_weights(self.height, h, self.valid_y1 / self.stride)
        self.cols = axis_weights(self.width, w, self.valid_x1 / self.stride)
        self._norm2 = None
        self._row_matrix = self._col_matrix = None

    def vectors_at(self, points: np.ndarray) -> np.ndarray:
        """The upsampled map's vectors at integer pixels `points` (K, 2) as (x, y): (K, C)."""
        x = np.clip(points[:, 0].astype(np.int64), 0, self.width - 1)
        y = np.clip(points[:, 1].astype(np.int64), 0, self.height - 1)
        f = np.pad(self.features, ((0, 1), (0, 1), (0, 0)))
        r, c = self.rows, self.cols
        i, j = r.i0[y], c.i0[x]
        return ((r.a0[y] * c.a0[x])[:, None] * f[i, j] + (r.a0[y] * c.a1[x])[:, None] * f[i, j + 1]
                + (r.a1[y] * c.a0[x])[:, None] * f[i + 1, j] + (r.a1[y] * c.a1[x])[:, None] * f[i + 1, j + 1])

    def upsample(self, cell_maps: np.ndarray, ys=slice(None), xs=slice(None)) -> np.ndarray:
        """(K, h, w) per-cell values -> (K, H, W) bilinearly upsampled, as separable products
        (or only the pixel rows `ys` and columns `xs`)."""
        if self._row_matrix is None:
            h, w, _ = self.features.shape
            self._row_matrix = self.rows.matrix(h).astype(np.float32)
            self._col_matrix = self.cols.matrix(w).astype(np.float32).T.copy()
        return self._row_matrix[ys] @ cell_maps @ self._col_matrix[:, xs]

    def norm2(self) -> np.ndarray:
        """Squared norm of every upsampled vector, (H, W), from neighbour dot products of the cells."""
        if self._norm2 is None:
            f = self.features.astype(np.float64)
            h, w, _ = f.shape
            p = np.pad(f, ((0, 1), (1, 1), (0, 0)))  # a zero row below, a zero column each side

            def gram(di, dj):
                # <F[i, j], F[i + di, j + dj]> on a (h + 1, w + 1) grid, zeros outside the map.
                out = np.zeros((h + 1, w + 1))
                out[:h, :w] = np.einsum("ijc,ijc->ij", f, p[di:di + h, 1 + dj:1 + dj + w])
                return out

            g00, g01, g10, g11, g1m = gram(0, 0), gram(0, 1), gram(1, 0), gram(1, 1), gram(1, -1)
            r, c = self.rows, self.cols
            i, j = r.i0[:, None], c.i0[None, :]
            w00, w01 = r.a0[:, None] * c.a0[None, :], r.a0[:, None] * c.a1[None, :]
            w10, w11 = r.a1[:, None] * c.a0[None, :], r.a1[:, None] * c.a1[None, :]
            self._norm2 = (
                w00**2 * g00[i, j] + w01**2 * g00[i, j + 1] + w10**2 * g00[i + 1, j] + w11**2 * g00[i + 1, j + 1]
                + 2 * (w00 * w01 * g01[i, j] + w10 * w11 * g01[i + 1, j] + w00 * w10 * g10[i, j]
                       + w01 * w11 * g10[i, j + 1] + w00 * w11 * g11[i, j] + w01 * w10 * g1m[i, j + 1])
            )
        return self._norm2

    def cosine(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query (K, C) with every upsampled target vector: (K, H, W)."""
        h, w, c = self.features.shape
        dots = (self.features.reshape(-1, c) @ queries.T.astype(np.float32)).T.reshape(-1, h, w)
        norms = np.sqrt(np.maximum(self.norm2(), 1e-24))
        qn = np.maximum(np.linalg.norm(queries, axis=1), 1e-12)
        return self.upsample(dots) / norms[None] / qn[:, None, None]


def argmax_points(scores: np.ndarray) -> np.ndarray:
    """(K, H, W) -> (K, 2) integer (x, y) of each map's first maximum (row-major)."""
    k, h, w = scores.shape
    flat = scores.reshape(k, -1).argmax(axis=1)
    return np.stack([flat % w, flat // w], axis=1)


def similarity_stats(scores: np.ndarray, best: np.ndarray) -> dict[str, np.ndarray]:
    """Per map: max, mean, std, normalised entropy of the min-shifted map, and second-peak ratio
    (the best value farther than a tenth of the longer side from the peak, over the peak)."""
    k, h, w = scores.shape
    flat = scores.reshape(k, -1).astype(np.float64)
    shifted = flat - flat.min(axis=1, keepdims=True)
    p = shifted / np.maximum(shifted.sum(axis=1, keepdims=True), 1e-12)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1) / np.log(flat.shape[1])
    yy, xx = np.mgrid[0:h, 0:w]
    radius = max(h, w) / 10
    far = (xx[None] - best[:, 0, None, None]) ** 2 + (yy[None] - best[:, 1, None, None]) ** 2 > radius**2
    second = np.where(far.reshape(k, -1), flat, -np.inf).max(axis=1)
    peak = flat.max(axis=1)
    return {"sim_max": peak, "sim_mean": flat.mean(axis=1), "sim_std": flat.std(axis=1), "sim_entropy": entropy,
            "sim_peak_ratio": second / np.where(np.abs(peak) > 1e-12, peak, 1e-12)}


def match_dift(source: FeatureMap, target: FeatureMap, points: np.ndarray):
    """DIFT's protocol: (predicted (K, 2) points, similarity statistics)."""
    scores = target.cosine(source.vectors_at(points))
    best = argmax_points(scores)
    return best, similarity_stats(scores, best)


class TargetIndex:
    """FAISS inner-product index over one target map's L2-normalised cells."""

    def __init__(self, target: FeatureMap):
        h, w, c = target.features.shape
        cells = target.features.reshape(-1, c).astype(np.float32, copy=True)  # normalised in place below
        faiss.normalize_L2(cells)
        self.target, self.shape = target, (h, w)
        self.index = faiss.IndexFlatIP(c)
        self.index.add(cells)

    def search(self, queries: np.ndarray, top_k: int):
        q = queries.astype(np.float32, copy=True)
        faiss.normalize_L2(q)
        return self.index.search(q, min(top_k, self.index.ntotal))


def match_fast(source: FeatureMap, index: TargetIndex, points: np.ndarray, top_k: int = 10):
    """FAISS top-k cells, then the exact cosine over the image pixels around them."""
    target = index.target
    queries = source.vectors_at(points)
    cell_scores, cells = index.search(queries, top_k)
    h, w = index.shape
    rows, cols = target.rows, target.cols
    norms = np.sqrt(np.maximum(target.norm2(), 1e-24))
    flat_features = target.features.reshape(-1, target.features.shape[2])
    best = np.zeros((len(points), 2), dtype=np.int64)
    for k, query in enumerate(queries):
        ci, cj = cells[k] // w, cells[k] % w
        # Pixels whose interpolation taps touch a candidate cell or its neighbours.
        ys = np.flatnonzero(np.isin(rows.i0, np.unique(np.clip(np.r_[ci - 1, ci, ci + 1], 0, h - 1))))
        xs = np.flatnonzero(np.isin(cols.i0, np.unique(np.clip(np.r_[cj - 1, cj, cj + 1], 0, w - 1))))
        dots = (flat_features @ query.astype(np.float32)).reshape(h, w)
        window = target.upsample(dots[None], ys, xs)[0] / norms[np.ix_(ys, xs)]
        y, x = np.unravel_index(window.argmax(), window.shape)
        best[k] = xs[x], ys[y]
    stats = {"sim_max": cell_scores[:, 0].astype(np.float64)}
    return best, stats
