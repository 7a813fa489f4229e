"""DIFT's DAVIS label propagation (semi-supervised video object segmentation), from per-frame feature maps.

Reference: Tsingularity/dift @ 9421eb2, eval_davis.py (`eval_video_tracking_davis`, `label_propagation`,
`restrict_neighborhood`, `norm_mask`, `to_one_hot`, `read_seg`, `read_frame`); DIFT_sd's settings (its
README): temperature 0.2, topk 15, n_last_frames 28, size_mask_neighborhood 15, up_ft_index 2 (stride 8).

The rule, for each target frame: features are L2-normalised per cell; the context is the first frame and
the queue of the last `context` predicted frames (oldest first after the first); the affinity of a target
cell (query) to a context cell (source) is exp(cos / temperature), zeroed where the source lies outside
the query's (2r + 1) x (2r + 1) window (r = `neighborhood`; r = 0 means no window, as DIFT skips the mask
then); over ALL context frames' candidates of a query together, values below the topk-th largest (zeros
included) are set to 0, ties kept; each query's weights are divided by their sum; the target's soft label
map is the weighted sum of the context cells' labels: the one-hot first annotation (downsampled with
PIL NEAREST to the feature grid) and the PREDICTED soft maps of the queued frames at feature resolution.
The queue drops its oldest frame when full before the new one is pushed. For output, a soft map is
upsampled bilinearly by the stride (align_corners=False), each channel with a positive max min-max
normalised (`norm_mask`), argmax over channels (first index on ties), uint8, then resized with PIL
NEAREST to the original (W, H).

What differs is the cost, not the rule: DIFT builds the window as a dense (hw x hw) mask (4 nested Python
loops, once per video) and multiplies a dense (contexts, hw, hw) affinity by it every frame. Here queries
are taken in TILE x TILE blocks, each compared with the source cells of its block's window only (the block
grown by r on each side: at DIFT_sd's 60 x 104 grid and r = 15, 1.4x the windows' products, a sixth of the
dense ones), pairs in that box but outside a query's window set to -inf before exp (DIFT's 0). The k-th
largest value is found without a dense topk: the best k + 1 values lie in the k + 1 source cells whose
best context is best, so the window is applied to and searched over those per-cell maxima, and only those
cells' values are ranked. Values equal to the k-th are kept as DIFT keeps them: when the (k+1)-th equals
the k-th, that query's whole row is weighed. The result is DIFT's up to float32 rounding: the products
sum in another order, so where a query's k-th and (k+1)-th cosines are within an ulp or two (a few
queries a frame at DAVIS size) either may be kept. Frames are streamed: at most context + 1 frames'
features are held.

Shapes: a feature map is (h, w, c) (rows, columns, channels); a label map (C, h, w); an image size
(W, H) as PIL's `Image.size`; `grid` is (h, w) as torch and numpy shapes are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import PipelineError

# Query block side. A block compares its TILE^2 queries with (TILE + 2r)^2 source cells a context: smaller
# blocks waste fewer products on cells outside the windows, but multiply smaller matrices, which the CPU
# does slower (at DAVIS size 8 measured best of 6-16 on 2 cores; rows cut to each query's window in 1-row
# products were slower still).
TILE = 8


@dataclass(frozen=True)
class PropagationSettings:
    """DIFT_sd's DAVIS settings (eval_davis.py's arguments in its README's command)."""

    temperature: float = 0.2  # --temperature
    topk: int = 15  # --topk
    neighborhood: int = 15  # --size_mask_neighborhood; 0: no window (DIFT applies no mask then)
    context: int = 28  # --n_last_frames: predicted frames queued besides the first

    def __post_init__(self):
        if not self.temperature > 0:
            raise PipelineError(None, "temperature", f"must be > 0, got {self.temperature}")
        if self.topk < 1:
            raise PipelineError(None, "topk", f"must be >= 1, got {self.topk}")
        if self.neighborhood < 0:
            raise PipelineError(None, "neighborhood", f"must be >= 0, got {self.neighborhood}")
        if self.context < 1:
            # DIFT's queue.Queue(0) is unbounded and its loop then blocks on get() from the empty queue.
            raise PipelineError(None, "context", f"must be >= 1, got {self.context}")


def first_labels(annotation: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The (h, w) uint8 labels of a first frame's full-size (H, W) annotation on a feature grid of
    `grid` = (h, w) (rows, columns): PIL NEAREST resize to size (w, h), as read_seg does (its
    `seg.resize((_tw // scale_factor, _th // scale_factor), 0)`)."""
    annotation = np.asarray(annotation)
    if annotation.ndim != 2:
        raise PipelineError(None, "annotation", f"must be (H, W) object indices, got shape {annotation.shape}")
    if annotation.size and (annotation.min() < 0 or annotation.max() > 255):
        raise PipelineError(None, "annotation", "object indices must lie in 0..255 (an indexed PNG's range)")
    rows, columns = grid
    image = Image.fromarray(annotation.astype(np.uint8))
    return np.array(image.resize((columns, rows), Image.Resampling.NEAREST))


def one_hot(labels: np.ndarray, objects: int) -> torch.Tensor:
    """(objects + 1, h, w) float32 one-hot of (h, w) labels 0..objects (0: background).

    With `objects` = max(labels) it is DIFT's to_one_hot (as `propagate_video` calls it). A larger `objects`
    (one lost in the downsampling) adds channels of zeros, which stay zero, are not normalised and never win
    an argmax (ties go to the first channel): the same masks."""
    labels = torch.as_tensor(np.asarray(labels).astype(np.int64))
    if labels.numel() and (labels.min() < 0 or labels.max() > objects):
        raise PipelineError(None, "labels", f"must lie in 0..{objects}, got {labels.min()}..{labels.max()}")
    return F.one_hot(labels, objects + 1).permute(2, 0, 1).to(torch.float32).contiguous()


@dataclass(frozen=True)
class _Tile:
    rows: slice  # the block's query rows
    columns: slice
    source_rows: slice  # the block grown by the radius, clipped to the grid
    source_columns: slice
    outside: torch.Tensor | None  # (source rows, queries, source columns): out of the query's window; None: none is


def _tiles(height: int, width: int, radius: int, device: torch.device) -> list[_Tile]:
    tiles = []
    for y0 in range(0, height, TILE):
        y1 = min(height, y0 + TILE)
        ya, yb = max(0, y0 - radius), min(height, y1 + radius)
        for x0 in range(0, width, TILE):
            x1 = min(width, x0 + TILE)
            xa, xb = max(0, x0 - radius), min(width, x1 + radius)
            qy = torch.arange(y0, y1, device=device).repeat_interleave(x1 - x0)
            qx = torch.arange(x0, x1, device=device).repeat(y1 - y0)
            far_y = (torch.arange(ya, yb, device=device)[:, None, None] - qy[None, :, None]).abs() > radius
            far_x = (torch.arange(xa, xb, device=device)[None, None, :] - qx[None, :, None]).abs() > radius
            outside = far_y | far_x
            tiles.append(_Tile(slice(y0, y1), slice(x0, x1), slice(ya, yb), slice(xa, xb),
                               outside if bool(outside.any()) else None))
    return tiles


def _normalised(features, device: torch.device, grid: tuple[int, int] | None, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if tensor.ndim != 3 or (grid is not None and tuple(tensor.shape[:2]) != grid):
        raise PipelineError(None, f"features[{index}]", f"must be (h, w, c) = {grid or '(h, w)'} x c, got "
                                                        f"{tuple(tensor.shape)}")
    return F.normalize(tensor.to(device=device, dtype=torch.float32), dim=-1, p=2)


def _propagate_frame(target: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, tiles: list[_Tile],
                     settings: PropagationSettings) -> torch.Tensor:
    """The (h, w, C) soft labels of `target` (h, w, c) from context `features` (h, w, n, c) and their
    `labels` (h, w, n, C); the context frames' order does not matter (sums only)."""
    height, width, contexts, channels = features.shape
    classes = labels.shape[-1]
    k = settings.topk
    out = torch.empty(height, width, classes, device=target.device, dtype=torch.float32)
    for tile in tiles:
        query = target[tile.rows, tile.columns].reshape(-1, channels)
        queries = query.shape[0]
        # (source row, (source column, context)): each source row of the box is one contiguous block of the
        # (h, w, n, c) buffer, so the product reads the buffer in place.
        box = features[tile.source_rows, tile.source_columns]
        rows, columns = box.shape[:2]
        per_row = columns * contexts
        similarity = torch.bmm(query.expand(rows, queries, channels),
                               box.reshape(rows, per_row, channels).transpose(1, 2))  # (rows, queries, per_row)
        cells = similarity.view(rows, queries, columns, contexts)
        # A query's best k + 1 values lie in the k + 1 source cells whose best context value is largest (a
        # value in another cell is at most each of their k + 1 maxima), so the window is applied to, and
        # searched over, the cells' maxima: 1 / contexts of the values.
        best_of_cell = cells.amax(dim=3)
        if tile.outside is not None:
            best_of_cell.masked_fill_(tile.outside, -math.inf)
        best_of_cell = best_of_cell.transpose(0, 1).reshape(queries, rows * columns)
        cell_values, cell = best_of_cell.topk(min(k + 1, rows * columns), dim=1, sorted=False)
        candidates = cells[cell // columns, torch.arange(queries, device=cell.device)[:, None], cell % columns]
        candidates = candidates.masked_fill_((cell_values == -math.inf)[..., None], -math.inf)
        m = min(k + 1, candidates.shape[1] * contexts)
        values, best = candidates.reshape(queries, -1).topk(m, dim=1)
        index = cell.gather(1, best // contexts) * contexts + best % contexts  # into (rows, columns, contexts)
        weights = torch.exp(values / settings.temperature)  # as DIFT: exp(cos / T); -inf (outside) gives 0
        # Sorted descending, so the first min(k, m) are those >= the k-th largest (when fewer than k are in
        # the box, DIFT's k-th largest is a zero from outside it: all are kept).
        kept = weights[:, :min(k, m)]
        box_labels = labels[tile.source_rows, tile.source_columns].reshape(rows * per_row, classes)
        share = kept / kept.sum(1, keepdim=True)
        soft = (share[..., None] * box_labels[index[:, :min(k, m)]]).sum(1)
        if m > k:
            tied = (weights[:, k] == weights[:, k - 1]) & (weights[:, k - 1] > 0)
            if bool(tied.any()):
                # DIFT keeps every value equal to the k-th: weigh these queries' whole rows.
                which = tied.nonzero().squeeze(1)
                full = cells[:, which]
                if tile.outside is not None:
                    full = full.masked_fill(tile.outside[:, which, :, None], -math.inf)
                full = torch.exp(full.transpose(0, 1).reshape(len(which), -1) / settings.temperature)
                full = torch.where(full >= weights[which, k - 1:k], full, torch.zeros((), device=full.device))
                soft[which] = (full / full.sum(1, keepdim=True)) @ box_labels
        out[tile.rows, tile.columns] = soft.view(tile.rows.stop - tile.rows.start,
                                                 tile.columns.stop - tile.columns.start, classes)
    return out


def propagate(first: torch.Tensor, features: Iterable[torch.Tensor | np.ndarray],
              settings: PropagationSettings = PropagationSettings(), device: str = "cpu") -> Iterator[torch.Tensor]:
    """The (C, h, w) float32 soft label maps (on `device`) of frames 1..N-1, one at a time.

    `first` is frame 0's (C, h, w) labels (`one_hot(first_labels(...))`); `features` yields the (h, w, c)
    feature maps of frames 0..N-1 (any float dtype, tensors or arrays), read one at a time: at most
    context + 1 frames' features are held, whatever N."""
    device = torch.device(device)
    frames = iter(features)
    try:
        reference = _normalised(next(frames), device, None, 0)
    except StopIteration:
        return
    height, width, _ = reference.shape
    first = torch.as_tensor(first)
    if first.ndim != 3 or tuple(first.shape[1:]) != (height, width):
        raise PipelineError(None, "first", f"labels must be (C, {height}, {width}) as frame 0's features, got "
                                           f"{tuple(first.shape)}")
    radius = settings.neighborhood if settings.neighborhood > 0 else max(height, width)
    tiles = _tiles(height, width, radius, device)
    # Slot 0 is the first frame; slots 1.. the queue, in the order frames arrive until it is full, then the
    # oldest slot is overwritten (queue order does not change the sums).
    context_features = reference[:, :, None].contiguous()
    context_labels = first.to(device=device, dtype=torch.float32).permute(1, 2, 0)[:, :, None].contiguous()
    oldest = 1
    for index, raw in enumerate(frames, start=1):
        target = _normalised(raw, device, (height, width), index)
        if context_features.shape[2] * height * width < settings.topk:
            # DIFT's torch.topk over every context candidate fails here ("selected index k out of range").
            raise PipelineError(None, "topk", f"{settings.topk} exceeds the {context_features.shape[2]} x "
                                              f"{height * width} candidates of frame {index}")
        soft = _propagate_frame(target, context_features, context_labels, tiles, settings)
        if context_features.shape[2] <= settings.context:
            context_features = torch.cat([context_features, target[:, :, None]], dim=2)
            context_labels = torch.cat([context_labels, soft[:, :, None]], dim=2)
        else:
            context_features[:, :, oldest] = target
            context_labels[:, :, oldest] = soft
            oldest = oldest % settings.context + 1
        yield soft.permute(2, 0, 1).contiguous()


def _norm_mask(mask: torch.Tensor) -> torch.Tensor:
    # DIFT's norm_mask, kept per channel and in place: a constant positive channel becomes NaN there too.
    for channel in range(mask.shape[0]):
        values = mask[channel]
        if values.max() > 0:
            values = values - values.min()
            values = values / values.max()
            mask[channel] = values
    return mask


def to_mask(soft: torch.Tensor, stride: float, original_size: tuple[int, int]) -> np.ndarray:
    """A (C, h, w) soft label map as DIFT writes it: an (H, W) uint8 mask of object indices for a frame of
    `original_size` = (W, H). Upsampled by `stride` (bilinear, align_corners=False) to the canvas, each
    channel normalised (`norm_mask`), argmax over channels, PIL NEAREST resize to (W, H)."""
    width, height = original_size
    up = F.interpolate(soft[None].to(torch.float32), scale_factor=stride, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    _, segmentation = torch.max(_norm_mask(up), dim=0)
    segmentation = segmentation.cpu().numpy().astype(np.uint8)  # as np.array(..., dtype=np.uint8): wraps past 255
    return np.array(Image.fromarray(segmentation).resize((width, height), Image.Resampling.NEAREST))


def propagate_video(annotation: np.ndarray, features: Iterable[torch.Tensor | np.ndarray], stride: float,
                    settings: PropagationSettings = PropagationSettings(), device: str = "cpu") -> Iterator[np.ndarray]:
    """The (H, W) uint8 masks of frames 1..N-1 of a video whose frame 0 is annotated with `annotation`
    (H, W) (object indices, 0 background), from its frames' (h, w, c) feature maps, `stride` canvas pixels a
    cell (DIFT's canvas: pipeline/cache/encode.py, `short-side`)."""
    annotation = np.asarray(annotation)
    frames = iter(features)
    try:
        head = next(frames)
    except StopIteration:
        return
    grid = tuple(head.shape[:2])
    labels = first_labels(annotation, grid)
    first = one_hot(labels, int(labels.max()))
    for soft in propagate(first, chain([head], frames), settings, device):
        yield to_mask(soft, stride, (annotation.shape[1], annotation.shape[0]))
