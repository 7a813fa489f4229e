"""Keypoint matching protocols over cached feature maps: batched torch code, on the CPU or CUDA.

`dift` is DIFT's SPair evaluation, exactly: both maps bilinearly upsampled (align_corners=False) to
their image's original (H, W); the source vector read at the integer keypoint; the prediction is the
first (row-major) argmax of cosine similarity over every target pixel. No upsampled map is built:
- the source vector is the bilinear blend of its <= 4 cells (only those cells are read or transformed);
- the upsampled dot map is the interpolation of the cell dot map, and the squared norm of an
  interpolated vector a fixed combination of dot products between its <= 4 neighbouring cells: both
  per target, shared by every query of every pair that uses it (`DiftTarget`);
- the argmax is found by branch and bound over "quads", the pixels that blend the same 2 x 2 cells: a
  pixel's dot is a convex blend of its quad's 4 cell dots, so max(4 dots) x max(1/norm over the quad)
  bounds the quad. The best quads are evaluated pixel by pixel until the best value found beats every
  unevaluated bound; so the answer is the full map's argmax, at a few hundred pixels a query.

`geoaware` is GeoAware-SC's evaluation, exactly (Junyi42/GeoAware-SC @ 166f873, pck_train.py
`compute_pck` with its hard argmax, utils/utils_correspondence.py `kpts_to_patch_idx` and
`calculate_keypoint_transformation`, utils/utils_dataset.py `preprocess_kps_pad`), on a canvas that keeps
aspect (`center`: theirs; `pad`: the same with the image at the top-left):
- a keypoint lies on the canvas at X * s + x0 with ONE factor s = canvas / max(W, H) (although the resized
  image's short side was rounded), in float32 (`canvas_points`);
- the source cell is that coordinate x (cells / canvas), in float32, truncated (`geoaware_cells`);
- the cosine of that cell against every cell of the target grid; the prediction is the best cell's
  `index x stride + stride // 2` on the canvas (float32), mapped back to the image's pixels (`cell_points`);
- the verdict is theirs too, in canvas units: the rows carry the frame (`canvas_columns`) and
  pipeline.evaluation.metrics judges them.
`sd-dino` is sd-dino's evaluation (Junyi42/sd-dino @ b85df18, pck_spair_pascal.py): all the same but the
prediction, `(index - 1) x stride + stride + patch // 2 - 0.5`, i.e. `index x stride + stride // 2 - 0.5`
for a grid of non-overlapping patches (DINOv2: index x 14 + 6.5, half a pixel before the cell's centre).
On a `squash` canvas (no single factor: each axis has its own) both use each axis's factor, in float64,
and are judged in image pixels (strictly).

Geometry: a map of (h, w) cells with `stride` canvas pixels per cell; the image occupies the canvas
region [valid_x0, valid_x1) x [valid_y0, valid_y1) (the whole canvas in `squash` mode, the top-left in
`pad`, centred in `center`). Image pixel X maps to the continuous cell coordinate
u = (valid_x0 + (X + 0.5) * (valid_x1 - valid_x0) / W) / stride - 0.5, which for `squash` is exactly
PyTorch's align_corners=False rule. Only the valid region of the target is ever searched by `dift`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def axis_weights(pixels: int, cells: int, covered: float, start: float = 0.0) -> Axis:
    """Weights for `pixels` output pixels over `cells` cells, of which `covered` (fractional), from cell
    coordinate `start` on, hold the image."""
    u = start + (np.arange(pixels) + 0.5) * (covered / pixels) - 0.5
    u = np.maximum(u, 0.0)  # PyTorch clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(u).astype(np.int64), cells - 1)
    a1 = np.where(i0 < cells - 1, u - i0, 0.0)  # on the last cell both taps are that cell
    return Axis(i0=i0, a0=1.0 - a1, a1=a1)


@dataclass(frozen=True)
class CanvasFrame:
    """Where an image's pixels lie on its canvas: pixel (X, Y) at (x0 + X * scale_x, y0 + Y * scale_y).
    `single`: the canvas keeps aspect (`pad`, `center`) and, as GeoAware-SC maps keypoints, one factor
    canvas / max(W, H) serves both axes although each side of the resized image was rounded; otherwise
    (`squash` of a non-square image) each axis has its own factor."""

    scale_x: float
    scale_y: float
    x0: float
    y0: float
    single: bool


def canvas_frame(width: int, height: int, x0: float, y0: float, x1: float, y1: float) -> CanvasFrame:
    """The frame of an image whose valid region on the canvas is [x0, x1) x [y0, y1): one factor (the long
    side's) when each side is the image's side times it, rounded; else one per axis."""
    scale = max(x1 - x0, y1 - y0) / max(width, height)
    if abs((x1 - x0) - width * scale) <= 0.5 + 1e-9 and abs((y1 - y0) - height * scale) <= 0.5 + 1e-9:
        return CanvasFrame(scale, scale, float(x0), float(y0), True)
    return CanvasFrame((x1 - x0) / width, (y1 - y0) / height, float(x0), float(y0), False)


@dataclass
class FeatureMap:
    """One image's (h, w, C) map and how it lies over the image's original (H, W) pixels: the image covers
    the canvas region [valid_x0, valid_x1) x [valid_y0, valid_y1)."""

    features: np.ndarray  # (h, w, C) float32
    width: int
    height: int
    valid_x1: float  # canvas pixels: where the image ends
    valid_y1: float
    stride: float
    valid_x0: float = 0.0  # canvas pixels: where the image starts (non-zero in `center` mode)
    valid_y0: float = 0.0

    def __post_init__(self):
        h, w, _ = self.features.shape
        self.rows = axis_weights(self.height, h, (self.valid_y1 - self.valid_y0) / self.stride, self.valid_y0 / self.stride)
        self.cols = axis_weights(self.width, w, (self.valid_x1 - self.valid_x0) / self.stride, self.valid_x0 / self.stride)
        self.frame = canvas_frame(self.width, self.height, self.valid_x0, self.valid_y0, self.valid_x1, self.valid_y1)
        self._norm2 = None
        self._row_matrix = self._col_matrix = None

    def vectors_at(self, points: np.ndarray, transform=None) -> np.ndarray:
        """The upsampled map's vectors at integer pixels `points` (K, 2) as (x, y): (K, C). `transform`, if
        given, maps (..., C) cell vectors to transformed ones: only the <= 4 cells each point blends are."""
        x = np.clip(points[:, 0].astype(np.int64), 0, self.width - 1)
        y = np.clip(points[:, 1].astype(np.int64), 0, self.height - 1)
        h, w, _ = self.features.shape
        r, c = self.rows, self.cols
        i, j = r.i0[y], c.i0[x]
        i1, j1 = np.minimum(i + 1, h - 1), np.minimum(j + 1, w - 1)  # their weight is 0 on the last cell
        cells = self.features[np.stack([i, i, i1, i1], 1), np.stack([j, j1, j, j1], 1)]  # (K, 4, C)
        if transform is not None:
            cells = transform(cells)
        weights = np.stack([r.a0[y] * c.a0[x], r.a0[y] * c.a1[x], r.a1[y] * c.a0[x], r.a1[y] * c.a1[x]], 1)
        return np.einsum("kt,ktc->kc", weights.astype(np.float32), cells.astype(np.float32))

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


GRID_PROTOCOLS = ("geoaware", "sd-dino")  # hard argmax over the patch grid
# STATISTICS: none: no statistics; basic: sim_max, sim_mean, sim_std, exactly and cheaply from cell-level sums;
# all: also sim_entropy and sim_peak_ratio over the full upsampled map (dift only).
QUERY_BATCH = 2048
FIRST_QUADS = 16  # quads evaluated before the bound is checked; most queries need no more
EVALUATED_PIXELS = 1 << 22  # pixel values held at once when a query needs many quads  # queries scored together; bounds memory at ~QUERY_BATCH x cells x 4 bytes


def _tensor(array: np.ndarray, device, dtype=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)


def _members(first_tap: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels grouped by their first tap cell: (cells, most) pixel indices, padded, and the mask of real ones."""
    counts = np.bincount(first_tap, minlength=cells)
    most = max(int(counts.max()), 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.arange(most)
    members = starts[:, None] + offsets[None]
    mask = offsets[None] < counts[:, None]
    return np.where(mask, members, 0), mask


def _grouped(values: np.ndarray, first_tap: np.ndarray, cells: int, axis: int, reduce) -> np.ndarray:
    """`reduce` (np.maximum or np.minimum) of `values` over each cell's pixels along `axis` (pixels are
    ordered by cell); cells without pixels get NaN."""
    counts = np.bincount(first_tap, minlength=cells)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shape = list(values.shape)
    shape[axis] = cells
    out = np.full(shape, np.nan, dtype=np.float64)
    filled = np.flatnonzero(counts)
    index = [slice(None)] * values.ndim
    index[axis] = filled
    out[tuple(index)] = reduce.reduceat(values.astype(np.float64), starts[filled], axis=axis)
    return out


def _pool(values: np.ndarray, axis: Axis, cells: int, dim: int, first, second) -> np.ndarray:
    """Pixels along `dim` summed onto cells: each pixel's value x `first` onto its first tap cell, x `second`
    onto the next one (None: nothing). R^T X for an interpolation matrix R, without building R."""
    moved = np.moveaxis(values, dim, 0)
    counts = np.bincount(axis.i0, minlength=cells)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    filled = np.flatnonzero(counts)
    out = np.zeros((cells + 1,) + moved.shape[1:])
    for weights, offset in ((first, 0), (second, 1)):
        if weights is not None:
            weighted = weights.reshape((-1,) + (1,) * (moved.ndim - 1)) * moved
            out[filled + offset] += np.add.reduceat(weighted, starts[filled], axis=0)
    return np.moveaxis(out[:cells], 0, dim)


STATISTICS_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1), (1, -1))  # each pair of neighbouring cells once


class DiftTarget:
    """One target map, prepared once for any number of queries (the `dift` protocol): its cells, the
    inverse norms of its upsampled vectors, the quads' bounds and the statistics' weights, on `device`."""

    def __init__(self, target: FeatureMap, device="cpu"):
        self.map, self.device = target, torch.device(device)
        h, w, c = target.features.shape
        self.h, self.w = h, w
        self.cells = _tensor(target.features.reshape(-1, c), device, np.float64)  # see `dots`
        rows, cols = target.rows, target.cols
        inverse = (1.0 / np.sqrt(np.maximum(target.norm2(), 1e-24))).astype(np.float32)
        self.inverse = _tensor(inverse, device)
        # Each quad's pixels as a padded (R, C) block: row weights per quad row, column weights per quad
        # column, and per quad its pixels' inverse norms (0 on padding), padding mask and flat indices.
        quad_rows, row_real = _members(rows.i0, h)
        quad_cols, col_real = _members(cols.i0, w)
        self.row_a0, self.row_a1 = (_tensor(np.where(row_real, a[quad_rows], 0.0), device, np.float32) for a in (rows.a0, rows.a1))
        self.col_b0, self.col_b1 = (_tensor(np.where(col_real, b[quad_cols], 0.0), device, np.float32) for b in (cols.a0, cols.a1))
        real = (row_real[:, None, :, None] & col_real[None, :, None, :]).reshape(h * w, -1)
        ys, xs = quad_rows[:, None, :, None], quad_cols[None, :, None, :]
        self.block_inverse = _tensor(np.where(real, inverse[ys, xs].reshape(h * w, -1), 0.0), device, np.float32)
        self.block_padding = _tensor(np.where(real, 0.0, -np.inf), device, np.float32)
        self.block_pixel = _tensor((ys * target.width + xs).reshape(h * w, -1), device, np.int64)
        self.tap_rows = _tensor(np.minimum(np.arange(h) + 1, h - 1), device)
        self.tap_cols = _tensor(np.minimum(np.arange(w) + 1, w - 1), device)
        quad_max = _grouped(_grouped(inverse, rows.i0, h, 0, np.maximum), cols.i0, w, 1, np.maximum)
        quad_min = _grouped(_grouped(inverse, rows.i0, h, 0, np.minimum), cols.i0, w, 1, np.minimum)
        empty = np.isnan(quad_max).ravel()  # quads without pixels (cells outside the image): never chosen
        self.quad_padding = _tensor(np.where(empty, -np.inf, 0.0), device, np.float32) if empty.any() else None
        # A little slack: float32 rounding may put a blended value an ulp above its cells' maximum.
        self.quad_max = _tensor(np.nan_to_num(quad_max).ravel() * (1 + 1e-5), device, np.float32)
        self.quad_min = _tensor(np.nan_to_num(quad_min).ravel() * (1 - 1e-5), device, np.float32)
        self._inverse64 = inverse.astype(np.float64)
        self._statistics_weights = None

    def statistics_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the statistics over the H x W map, from the cell dots d (built on first use):
        mean = <d, M> / HW, and E[s^2] = sum over neighbour offsets o of <d * d shifted by o, M_o> / HW,
        where M_o sums inverse norm^2 x (weight on a cell) x (weight on its neighbour) over the pixels."""
        if self._statistics_weights is None:
            rows, cols, (h, w) = self.map.rows, self.map.cols, (self.h, self.w)
            inverse = self._inverse64
            mean = _pool(_pool(inverse, rows, h, 0, rows.a0, rows.a1), cols, w, 1, cols.a0, cols.a1)
            by_row = {0: _pool(inverse**2, rows, h, 0, rows.a0**2, rows.a1**2),
                      1: _pool(inverse**2, rows, h, 0, rows.a0 * rows.a1, None)}
            by_column = {0: (cols.a0**2, cols.a1**2), 1: (cols.a0 * cols.a1, None), -1: (None, cols.a0 * cols.a1)}
            squares = [(1.0 if (di, dj) == (0, 0) else 2.0) * _pool(by_row[di], cols, w, 1, *by_column[dj])
                       for di, dj in STATISTICS_OFFSETS]
            self._statistics_weights = _tensor(mean, self.device), _tensor(np.stack(squares), self.device)
        return self._statistics_weights

    def dots(self, queries: torch.Tensor) -> torch.Tensor:
        """(N, C) queries -> (N, h, w) float32 dot products with every cell, summed in float64: BLAS sums a
        row in another order for another batch size (one query alone, or a pair's, or a worker's), and in
        float32 that moves near-tied argmaxes; float64's last bits never reach the float32 result."""
        return (queries.double() @ self.cells.T).float().reshape(-1, self.h, self.w)

    def argmax(self, dots: torch.Tensor, query_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first (row-major) pixel of maximal cosine for each query: ((N, 2) x, y; (N,) cosine)."""
        n = dots.shape[0]
        corner = torch.maximum(dots, torch.cat([dots[:, 1:], dots[:, -1:]], 1))
        corner = torch.maximum(corner, torch.cat([corner[:, :, 1:], corner[:, :, -1:]], 2)).reshape(n, -1)
        # max(4 dots) x the quad's largest inverse norm (smallest, for a negative dot) bounds the quad.
        bounds = torch.maximum(corner * self.quad_max, corner * self.quad_min)
        if self.quad_padding is not None:
            bounds += self.quad_padding
        flat = dots.reshape(n, -1)
        quads = bounds.shape[1]
        tried = min(FIRST_QUADS, quads)
        top, chosen = torch.topk(bounds, min(tried + 1, quads), dim=1)
        best_value, best_pixel = self._evaluate(flat, chosen[:, :tried])
        if tried < quads:  # then every quad that could still hold the best (bound >= value found), at once
            todo = torch.nonzero(best_value <= top[:, tried]).flatten()
            block = self.block_padding.shape[1]
            for start in range(0, len(todo), 64):
                rows = todo[start:start + 64]
                open_bounds = bounds[rows]
                need = int((open_bounds >= best_value[rows, None]).sum(1).max())
                step = max(1, EVALUATED_PIXELS // (need * block))  # queries at a time, to bound memory
                for part in range(0, len(rows), step):
                    some = rows[part:part + step]
                    chosen = torch.topk(open_bounds[part:part + step], need, dim=1).indices
                    best_value[some], best_pixel[some] = self._evaluate(flat[some], chosen)
        width = self.map.width
        return torch.stack([best_pixel % width, best_pixel // width], 1), best_value / query_norms

    def _evaluate(self, flat: torch.Tensor, quads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact upsampled dot x inverse norm at every pixel of the given quads (N, m): each query's
        largest value and its first (row-major) pixel."""
        i, j = quads // self.w, quads % self.w
        i1, j1 = self.tap_rows[i], self.tap_cols[j]
        d00, d01 = flat.gather(1, i * self.w + j)[..., None], flat.gather(1, i * self.w + j1)[..., None]
        d10, d11 = flat.gather(1, i1 * self.w + j)[..., None], flat.gather(1, i1 * self.w + j1)[..., None]
        a0, a1 = self.row_a0[i], self.row_a1[i]  # (N, m, R)
        left = (a0 * d00 + a1 * d10)[..., None]  # the row blend first, as rows @ dots @ cols does
        right = (a0 * d01 + a1 * d11)[..., None]
        values = self.col_b0[j][:, :, None, :] * left + self.col_b1[j][:, :, None, :] * right  # (N, m, R, C)
        values = values.reshape(*quads.shape, -1) * self.block_inverse[quads] + self.block_padding[quads]
        values = values.reshape(len(flat), -1)
        best = values.amax(1)
        pixels = self.block_pixel[quads].reshape(len(flat), -1)
        first = torch.where(values == best[:, None], pixels, torch.iinfo(torch.long).max).amin(1)
        return best, first

    def statistics(self, dots: torch.Tensor, query_norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """sim_mean and sim_std of each query's cosine over the H x W map, exactly, from the cell dots."""
        mean_weights, square_weights = self.statistics_weights()
        d = dots.double()
        h, w = self.h, self.w
        pixels = self.map.width * self.map.height
        mean = (d.reshape(len(d), -1) @ mean_weights.reshape(-1)) / pixels
        square = torch.zeros_like(mean)
        for (di, dj), weights in zip(STATISTICS_OFFSETS, square_weights):
            near = slice(max(-dj, 0), w - max(dj, 0))  # cells whose neighbour at (di, dj) exists
            far = slice(max(dj, 0), w - max(-dj, 0))
            square += ((d[:, : h - di, near] * weights[: h - di, near]) * d[:, di:, far]).sum((1, 2))
        norms = query_norms.double()
        mean, square = mean / norms, square / pixels / norms**2
        return {"sim_mean": mean, "sim_std": torch.sqrt(torch.clamp(square - mean**2, min=0.0))}


class GeoawareTarget:
    """One target map for the `geoaware` or `sd-dino` protocol: its L2-normalised cells, on `device`."""

    def __init__(self, target: FeatureMap, device="cpu", protocol: str = "geoaware"):
        self.map, self.protocol = target, protocol
        h, w, c = target.features.shape
        self.h, self.w = h, w
        cells = _tensor(target.features.reshape(-1, c), device, np.float64)
        self.cells = cells / cells.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def match(self, queries: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N, 2) predicted points (the best cell's prediction point, in image pixels: `cell_points`) and
        basic statistics."""
        queries = queries.double()  # as DiftTarget.dots: the same answer whatever the batch
        cosine = ((queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ self.cells.T).float()
        value, best = cosine.max(1)
        index = best.cpu().numpy()
        points = cell_points(self.map.frame, self.map.stride, index // self.w, index % self.w, self.protocol)
        d = cosine.double()
        return torch.from_numpy(points), {"sim_max": value.double(), "sim_mean": d.mean(1), "sim_std": d.std(1, correction=0)}


def canvas_points(frame: CanvasFrame, points: np.ndarray) -> np.ndarray:
    """(K, 2) image points on a single-factor canvas as GeoAware-SC's `preprocess_kps_pad` puts them:
    float32 point x float32 factor, plus the offset, in float32."""
    xy = np.asarray(points, dtype=np.float32) * np.float32(frame.scale_x)
    return xy + np.array([frame.x0, frame.y0], dtype=np.float32)


def geoaware_cells(source: FeatureMap, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cell (row, column) holding each (x, y) keypoint. On a single-factor canvas, GeoAware-SC's
    `kpts_to_patch_idx`: the float32 canvas coordinate x float32(cells / canvas), truncated; otherwise
    (`squash`) each axis's canvas coordinate over the stride, in float64, floored."""
    h, w, _ = source.features.shape
    frame = source.frame
    if frame.single:
        xy = canvas_points(frame, points)
        column = (np.float32(w / (w * source.stride)) * xy[:, 0]).astype(np.int32).astype(np.int64)
        row = (np.float32(h / (h * source.stride)) * xy[:, 1]).astype(np.int32).astype(np.int64)
    else:
        column = np.floor((frame.x0 + points[:, 0] * frame.scale_x) / source.stride).astype(np.int64)
        row = np.floor((frame.y0 + points[:, 1] * frame.scale_y) / source.stride).astype(np.int64)
    return np.clip(row, 0, h - 1), np.clip(column, 0, w - 1)


def canvas_prediction(index, stride: float, protocol: str = "geoaware") -> np.ndarray:
    """Where a protocol puts its prediction for cell `index` (along one axis) on the canvas, in float32:
    GeoAware-SC `index x stride + stride // 2` (the cell's centre for an even stride), sd-dino half a pixel
    less (its `(index - 1) x stride + stride + patch // 2 - 0.5`, with patch = stride)."""
    offset = float(stride) // 2 - (0.5 if protocol == "sd-dino" else 0.0)
    return np.asarray(index).astype(np.float32) * np.float32(stride) + np.float32(offset)


def cell_points(frame: CanvasFrame, stride: float, rows, columns, protocol: str = "geoaware") -> np.ndarray:
    """(N, 2) float64 (x, y) image pixels of the protocol's prediction for cells (rows, columns)."""
    x = (canvas_prediction(columns, stride, protocol).astype(np.float64) - frame.x0) / frame.scale_x
    y = (canvas_prediction(rows, stride, protocol).astype(np.float64) - frame.y0) / frame.scale_y
    return np.stack([x, y], axis=-1)


def canvas_columns(target: FeatureMap, protocol: str) -> dict[str, float]:
    """The predictions table's record of how a protocol judges its predictions on this target: for `geoaware`
    and `sd-dino` on a single-factor canvas, the frame (`canvas_scale` s, `canvas_x0`, `canvas_y0`: canvas =
    image x s + offset), so that PCK is counted in canvas units as they count it; NaN otherwise (`dift`,
    or a `squash` canvas: judged in image pixels)."""
    frame = target.frame
    if protocol in GRID_PROTOCOLS and frame.single:
        return {"canvas_scale": frame.scale_x, "canvas_x0": frame.x0, "canvas_y0": frame.y0}
    return {"canvas_scale": np.nan, "canvas_x0": np.nan, "canvas_y0": np.nan}


def prepare_target(target: FeatureMap, protocol: str, device="cpu"):
    """What a protocol computes once per target map, for every query of every pair that uses it."""
    return DiftTarget(target, device) if protocol == "dift" else GeoawareTarget(target, device, protocol)


def source_queries(source: FeatureMap, transform, points: np.ndarray, protocol: str) -> np.ndarray:
    """(K, C) query vectors of a source map at (K, 2) keypoints: the bilinear blend of <= 4 cells (`dift`) or
    the keypoint's cell (`geoaware`, `sd-dino`); `transform` (None: raw) applies to those cells only."""
    if protocol == "dift":
        return source.vectors_at(points, transform)
    row, column = geoaware_cells(source, points)
    cells = source.features[row, column]
    return np.asarray(cells if transform is None else transform(cells), dtype=np.float32)


def match_queries(target: FeatureMap, queries: np.ndarray, protocol: str = "dift", statistics: str = "basic",
                  device="cpu", prepared=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Predicted (N, 2) target points for (N, C) source vectors (bilinear for `dift`, a cell for
    `geoaware` and `sd-dino`), with their similarity statistics. `prepared`: the target's
    DiftTarget/GeoawareTarget, to reuse across calls."""
    prepared = prepared or prepare_target(target, protocol, device)
    points, stats = [], []
    for start in range(0, len(queries), QUERY_BATCH):
        batch = _tensor(queries[start:start + QUERY_BATCH], prepared.cells.device, np.float32)
        if protocol == "dift":
            dots = prepared.dots(batch)
            norms = batch.double().norm(dim=1).float().clamp_min(1e-12)
            found, value = prepared.argmax(dots, norms)
            stats.append({} if statistics == "none" else {"sim_max": value.double(), **prepared.statistics(dots, norms)})
        else:
            found, stat = prepared.match(batch)
            stats.append({} if statistics == "none" else stat)
        points.append(found)
    predicted = torch.cat(points).cpu().numpy()
    result = {name: torch.cat([s[name] for s in stats]).cpu().numpy() for name in stats[0]}
    if statistics == "all" and protocol == "dift":
        scores = target.cosine(queries)
        result.update({k: v for k, v in similarity_stats(scores, argmax_points(scores)).items()
                       if k in ("sim_entropy", "sim_peak_ratio")})
    return predicted, result


def match_dift(source: FeatureMap, target: FeatureMap, points: np.ndarray, statistics: str = "basic", device="cpu"):
    """DIFT's protocol for one pair: (predicted (K, 2) points, similarity statistics)."""
    return match_queries(target, source_queries(source, None, points, "dift"), "dift", statistics, device)


def match_geoaware(source: FeatureMap, target: FeatureMap, points: np.ndarray, device="cpu", protocol: str = "geoaware"):
    """GeoAware-SC's (or, with protocol `sd-dino`, sd-dino's) protocol for one pair: (predicted (K, 2) points,
    similarity statistics)."""
    return match_queries(target, source_queries(source, None, points, protocol), protocol, device=device)
