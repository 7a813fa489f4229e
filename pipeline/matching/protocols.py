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
        h, w, _ = self.features.shape
        r, c = self.rows, self.cols
        i, j = r.i0[y], c.i0[x]
        i1, j1 = np.minimum(i + 1, h - 1), np.minimum(j + 1, w - 1)  # their weight is 0 on the last cell
        f = self.features
        return ((r.a0[y] * c.a0[x])[:, None] * f[i, j] + (r.a0[y] * c.a1[x])[:, None] * f[i, j1]
                + (r.a1[y] * c.a0[x])[:, None] * f[i1, j] + (r.a1[y] * c.a1[x])[:, None] * f[i1, j1])

    def upsample(self, cell_maps: np.ndarray, ys=slice(None), xs=slice(None)) -> np.ndarray:
        """(K, h, w) per-cell values -> (K, H, W) bilinearly upsampled, as separable products
        (or only the pixel rows `ys` and columns `xs`)."""
        rows, cols = self.interpolation_matrices()
        return rows[ys] @ cell_maps @ cols[:, xs]

    def interpolation_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, h) and (w, W) float32 matrices: upsampled = rows @ cell_map @ cols. Built once."""
        if self._row_matrix is None:
            h, w, _ = self.features.shape
            self._row_matrix = self.rows.matrix(h).astype(np.float32)
            self._col_matrix = self.cols.matrix(w).astype(np.float32).T.copy()
        return self._row_matrix, self._col_matrix

    def norm2(self) -> np.ndarray:
        """Squared norm of every upsampled vector, (H, W), from neighbour dot products of the cells."""
        if self._norm2 is None:
            f = self.features
            h, w, _ = f.shape

            def gram(di, dj):
                # <F[i, j], F[i + di, j + dj]> on a (h + 1, w + 1) grid, zeros where the neighbour is outside.
                out = np.zeros((h + 1, w + 1), np.float32)
                a = f[: h - di, max(-dj, 0): w - max(dj, 0)]
                b = f[di:, max(dj, 0): w - max(-dj, 0)]
                out[: h - di, max(-dj, 0): w - max(dj, 0)] = np.einsum("ijc,ijc->ij", a, b)
                return out

            g00, g01, g10, g11, g1m = (gram(*offset) for offset in ((0, 0), (0, 1), (1, 0), (1, 1), (1, -1)))
            r, c = self.rows, self.cols

            def tap(g, di, dj):  # g[i0 + di, j0 + dj] for every output pixel: two contiguous takes
                return g.take(r.i0 + di, axis=0).take(c.i0 + dj, axis=1)

            a0, a1 = r.a0[:, None].astype(np.float32), r.a1[:, None].astype(np.float32)
            b0, b1 = c.a0[None].astype(np.float32), c.a1[None].astype(np.float32)
            b00, b11, b01 = b0 * b0, b1 * b1, b0 * b1
            # |sum_p w_p F_p|^2 over the 4 taps, w = a (row) x b (column): squares, then 2 x cross terms.
            self._norm2 = (
                (a0 * a0) * (b00 * tap(g00, 0, 0) + b11 * tap(g00, 0, 1) + 2 * b01 * tap(g01, 0, 0))
                + (a1 * a1) * (b00 * tap(g00, 1, 0) + b11 * tap(g00, 1, 1) + 2 * b01 * tap(g01, 1, 0))
                + (2 * a0 * a1) * (b00 * tap(g10, 0, 0) + b11 * tap(g10, 0, 1) + b01 * (tap(g11, 0, 0) + tap(g1m, 0, 1)))
            )
        return self._norm2

    def cosine(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query (K, C) with every upsampled target vector: (K, H, W)."""
        h, w, c = self.features.shape
        dots = (self.features.reshape(-1, c) @ queries.T.astype(np.float32)).T.reshape(-1, h, w)
        inverse_norms = 1.0 / np.sqrt(np.maximum(self.norm2(), 1e-24))
        qn = np.maximum(np.linalg.norm(queries, axis=1), 1e-12).astype(np.float32)
        scores = self.upsample(dots)
        scores *= inverse_norms[None]
        scores /= qn[:, None, None]
        return scores


def argmax_points(scores: np.ndarray) -> np.ndarray:
    """(K, H, W) -> (K, 2) integer (x, y) of each map's first maximum (row-major)."""
    k, h, w = scores.shape
    flat = scores.reshape(k, -1).argmax(axis=1)
    return np.stack([flat % w, flat // w], axis=1)


def similarity_stats(scores: np.ndarray, best: np.ndarray) -> dict[str, np.ndarray]:
    """Per map: max, mean, std, normalised entropy of the min-shifted map (0: one peak, 1: flat), and
    second-peak ratio (the best value farther than a tenth of the longer side from the peak, over the peak)."""
    k, h, w = scores.shape
    n = h * w
    flat = scores.reshape(k, -1)
    peak, low = flat.max(axis=1), flat.min(axis=1)
    total = flat.sum(axis=1, dtype=np.float64)
    mean = total / n
    std = np.sqrt(np.maximum(np.einsum("ij,ij->i", flat, flat, dtype=np.float64) / n - mean**2, 0.0))
    # Entropy of p = s / sum(s), s = map - min: log(S) - sum(s log s) / S, with in-place temporaries.
    shifted = flat - low[:, None]
    logs = np.maximum(shifted, 1e-30)
    np.log(logs, out=logs)
    mass = np.maximum(total - n * low, 1e-12)
    entropy = (np.log(mass) - np.einsum("ij,ij->i", shifted, logs, dtype=np.float64) / mass) / np.log(n)
    radius = max(h, w) / 10
    second = np.empty(k)
    for i, (x, y) in enumerate(best):
        y0, y1, x0, x1 = (max(int(y - radius), 0), min(int(y + radius) + 1, h),
                          max(int(x - radius), 0), min(int(x + radius) + 1, w))
        window = scores[i, y0:y1, x0:x1]
        saved = window.copy()
        yy, xx = np.ogrid[y0:y1, x0:x1]
        window[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = -np.inf
        second[i] = scores[i].max()
        window[...] = saved
    return {"sim_max": peak.astype(np.float64), "sim_mean": mean, "sim_std": std, "sim_entropy": entropy,
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
    """FAISS top-k cells, then the exact cosine over the image pixels whose taps touch a candidate
    cell or its neighbours, computed from those cells only."""
    target = index.target
    queries = source.vectors_at(points)
    cell_scores, cells = index.search(queries, top_k)
    h, w = index.shape
    rows, cols = target.rows, target.cols
    norms = np.sqrt(np.maximum(target.norm2(), 1e-24))
    row_matrix, col_matrix = target.interpolation_matrices()
    best = np.zeros((len(points), 2), dtype=np.int64)
    for k, query in enumerate(queries):
        found = cells[k][cells[k] >= 0]
        near_rows = np.unique(np.clip(np.add.outer(found // w, [-1, 0, 1]), 0, h - 1))
        near_cols = np.unique(np.clip(np.add.outer(found % w, [-1, 0, 1]), 0, w - 1))
        ys = np.flatnonzero(np.isin(rows.i0, near_rows))
        xs = np.flatnonzero(np.isin(cols.i0, near_cols))
        cell_rows = np.unique(np.r_[rows.i0[ys], np.minimum(rows.i0[ys] + 1, h - 1)])
        cell_cols = np.unique(np.r_[cols.i0[xs], np.minimum(cols.i0[xs] + 1, w - 1)])
        dots = target.features[np.ix_(cell_rows, cell_cols)] @ query.astype(np.float32)
        window = (row_matrix[np.ix_(ys, cell_rows)] @ dots @ col_matrix[np.ix_(cell_cols, xs)]
                  / norms[np.ix_(ys, xs)])
        y, x = np.unravel_index(window.argmax(), window.shape)
        best[k] = xs[x], ys[y]
    return best, {"sim_max": cell_scores[:, 0].astype(np.float64)}
