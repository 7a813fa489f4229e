"""Dataset-wide search: the cells of every image most similar to one cell, from a FAISS index per layer.

The index holds every cell that lies on its image (cells of the canvas's padding are left out), each
L2-normalised, so inner product is cosine. A query is the cell under an image point (the `geoaware` rule:
canvas coordinate over the stride, truncated), so a point's own cell comes back first, at cosine 1; a
cell's position in its image is where `geoaware` would predict it.

Size: an exact index (`IndexFlatIP`) while its vectors take at most FLAT_LIMIT_BYTES as float32 (the demo,
or one real layer of ~100 images); beyond, IVF-PQ (FAISS's `IVF<lists>,PQ<C/16>`: ~C/16 bytes a cell,
~1,600x smaller than float32, trained on a seeded sample), whose candidates (RERANK x top) are re-scored
exactly from the store, so reported similarities are always exact cosines.

Indexes live in the user's cache (pipeline/config.py, `user_cache`), outside the project where DVC does not
look: `search/<store name>-<fingerprint>/<layer>@<timestep>@<transform>.faiss`, with the cell table and what
it was built from; an index built from another version of the store is rebuilt. Together they take at most
CACHE_LIMIT_BYTES: the least recently used go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.matching.maps import StoreMaps
from pipeline.config import user_cache
from pipeline.errors import PipelineError
from pipeline.matching.protocols import canvas_frame, cell_points, geoaware_cells

FLAT_LIMIT_BYTES = 2 << 30
RERANK = 8  # IVF-PQ: candidates re-scored exactly, per result asked for
PROBES = 32  # IVF lists searched
TRAINING_CELLS_PER_LIST = 64
SEED = 0
CACHE_LIMIT_BYTES = 8 << 30  # all search indexes of this machine


@dataclass(frozen=True)
class Cell:
    """A cell of an image's map: its grid position, and its centre in the image's pixels."""

    image: str
    row: int
    column: int
    x: float
    y: float


def cell_centre(maps: StoreMaps, image: str, layer: str, row, column) -> tuple:
    """Cell (row, column) in the image's original pixels: GeoAware-SC's prediction point (the cell's centre
    for an even stride), `protocols.cell_points`."""
    info = maps.images.loc[image]
    stride = float(maps.root[layer].attrs["stride"])
    frame = canvas_frame(int(info["width"]), int(info["height"]), *(float(info[c]) for c in
                                                                   ("valid_x0", "valid_y0", "valid_x1", "valid_y1")))
    x, y = np.moveaxis(cell_points(frame, stride, np.asarray(row), np.asarray(column)), -1, 0)
    return x, y


def image_cells(maps: StoreMaps, image: str, layer: str) -> tuple[slice, slice]:
    """(rows, columns): the ranges of the cells that lie on the image (the rest of the canvas is padding)."""
    feature_map = maps.raw_map(image, layer, maps.timesteps[0])
    h, w, _ = feature_map.features.shape

    def cells(start: float, end: float, count: int) -> slice:
        stride = feature_map.stride
        return slice(max(0, int(np.floor(start / stride + 1e-9))), min(count, int(np.ceil(end / stride - 1e-9))))

    return (cells(feature_map.valid_y0, feature_map.valid_y1, h), cells(feature_map.valid_x0, feature_map.valid_x1, w))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class CellIndex:
    """Every on-image cell of one (layer, timestep, transform) of a store, searchable by cosine."""

    def __init__(self, maps: StoreMaps | str | Path, layer: str, timestep: int | None = None, transform: str = "raw",
                 quiet: bool = False):
        self.maps = maps if isinstance(maps, StoreMaps) else StoreMaps(maps)
        self.timestep = self.maps.timesteps[0] if timestep is None else int(timestep)
        self.maps.check_variant(layer, self.timestep)
        self.layer, self.transform = layer, transform
        self.images = [image for image in self.maps.images.index if self.maps.images.at[image, "done"]]
        self.path = index_path(self.maps, layer, self.timestep, transform)
        self.index, self.cells = self._load() or self._build(quiet)
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = PROBES
        self.exact = isinstance(self.index, faiss.IndexFlat)

    def _vectors(self, image: str) -> tuple[np.ndarray, np.ndarray]:
        """An image's on-image cells: (n, C) normalised vectors and (n, 2) (row, column)."""
        features = self.maps.load(image, self.layer, self.timestep, self.transform).features
        rows, columns = image_cells(self.maps, image, self.layer)
        grid = np.stack(np.meshgrid(np.arange(rows.start, rows.stop), np.arange(columns.start, columns.stop),
                                    indexing="ij"), -1).reshape(-1, 2)
        return _normalised(features[rows, columns].reshape(-1, features.shape[-1])), grid

    def _meta(self) -> dict:
        return {"fingerprint": self.maps.fingerprint, "layer": self.layer, "timestep": self.timestep,
                "transform": self.transform, "images": len(self.images),
                "done": hashlib.sha256("\n".join(self.images).encode()).hexdigest()}

    def _load(self):
        meta = self.path.with_suffix(".json")
        table = self.path.with_suffix(".cells.npy")
        if not (self.path.exists() and meta.exists() and table.exists()):
            return None
        try:
            found = json.loads(meta.read_text())
            if found != self._meta():
                print(f"{self.path}: rebuilding the search index (it was built from another version of the store)",
                      file=sys.stderr)
                return None
            os.utime(meta)  # recently used: kept when the cache is trimmed
            return faiss.read_index(str(self.path)), np.load(table)
        except (OSError, ValueError, RuntimeError):  # unreadable (a cache, not a record): built again
            print(f"{self.path}: rebuilding the search index (the cached one is unreadable)", file=sys.stderr)
            return None

    def _build(self, quiet: bool):
        if not self.images:
            raise PipelineError(self.maps.path, "images/done", "no extracted image to index")
        channels = self.maps.load(self.images[0], self.layer, self.timestep, self.transform).features.shape[-1]
        counts = [int(np.prod([s.stop - s.start for s in image_cells(self.maps, image, self.layer)]))
                  for image in self.images]
        total = sum(counts)
        if total * channels * 4 <= FLAT_LIMIT_BYTES:
            index = faiss.IndexFlatIP(channels)
        else:
            index = self._trained_ivfpq(channels, total, counts)
        tables = []
        bar = tqdm(self.images, unit="image", desc=f"index {self.maps.name} {self.layer} t={self.timestep}", disable=quiet)
        for position, image in enumerate(bar):
            vectors, grid = self._vectors(image)
            index.add(vectors)
            tables.append(np.column_stack([np.full(len(grid), self.maps.position[image]), grid]).astype(np.int32))
        cells = np.concatenate(tables)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written under temporary names (this process's own), then renamed, the record last: a killed build
        # leaves no index that looks complete, and two builds of one index do not mix.
        staging = self.path.with_name(f".{self.path.stem}.{os.getpid()}.{threading.get_ident()}")
        faiss.write_index(index, str(staging.with_suffix(".faiss")))
        np.save(staging.with_suffix(".cells.npy"), cells)
        staging.with_suffix(".json").write_text(json.dumps(self._meta()))
        for suffix in (".faiss", ".cells.npy", ".json"):
            os.replace(staging.with_suffix(suffix), self.path.with_suffix(suffix))
        trim_cache(self.path.parent.parent, keep=self.path)
        return index, cells

    @property
    def nbytes(self) -> int:
        """Memory the index and its cell table take (for the explorer's bounded cache)."""
        per_cell = self.index.d * 4 if self.exact else self.index.code_size
        return int(self.index.ntotal * per_cell + self.cells.nbytes)

    def _trained_ivfpq(self, channels: int, total: int, counts: list[int]):
        lists = int(2 ** np.clip(np.round(np.log2(4 * np.sqrt(total))), 4, 16))
        subquantizers = max(d for d in range(1, channels // 16 + 1) if channels % d == 0)
        index = faiss.index_factory(channels, f"IVF{lists},PQ{subquantizers}", faiss.METRIC_INNER_PRODUCT)
        wanted = min(total, lists * TRAINING_CELLS_PER_LIST)
        rng = np.random.default_rng(SEED)
        chosen = sorted(rng.choice(len(self.images), size=min(len(self.images), max(1, wanted * len(self.images) // total + 1)),
                                   replace=False))
        sample = np.concatenate([self._vectors(self.images[i])[0] for i in chosen])
        index.train(sample)
        return index

    def search(self, image: str, point, top: int = 20) -> pd.DataFrame:
        """The `top` cells most similar to the cell under `point` (x, y) of `image`, best first: rank, image,
        row, column, x, y (the cell's centre in its image), similarity (exact cosine)."""
        check_query(self.maps, image, point, top)
        source = self.maps.load(image, self.layer, self.timestep, self.transform)
        row, column = geoaware_cells(source, np.array([point], dtype=np.float64))
        query = _normalised(source.features[row, column])
        wanted = min(top if self.exact else top * RERANK, self.index.ntotal)
        scores, ids = self.index.search(query, wanted)
        ids = ids[0][ids[0] >= 0]
        found = self.cells[ids]
        if self.exact:
            similarity = scores[0][: len(ids)]
        else:
            similarity = self._exact_similarity(query[0], found)
            order = np.lexsort((ids, -similarity))  # best first; ties in index order
            found, similarity = found[order], similarity[order]
        found, similarity = found[:top], similarity[:top]
        names = self.maps.images.index.to_numpy()[found[:, 0]]
        xs, ys = zip(*(cell_centre(self.maps, name, self.layer, r, c) for name, r, c in zip(names, found[:, 1], found[:, 2])))
        return pd.DataFrame({"rank": np.arange(1, len(found) + 1), "image": names, "row": found[:, 1],
                             "column": found[:, 2], "x": np.asarray(xs, float), "y": np.asarray(ys, float),
                             "similarity": similarity.astype(np.float64)})

    def _exact_similarity(self, query: np.ndarray, cells: np.ndarray) -> np.ndarray:
        names = self.maps.images.index.to_numpy()
        similarity = np.empty(len(cells))
        for position in np.unique(cells[:, 0]):
            mine = np.flatnonzero(cells[:, 0] == position)
            features = self.maps.load(names[position], self.layer, self.timestep, self.transform).features
            similarity[mine] = _normalised(features[cells[mine, 1], cells[mine, 2]]) @ query
        return similarity


def check_query(maps: StoreMaps, image: str, point, top: int) -> None:
    """Refuse, before any index is built, a query no answer exists for: an image not extracted, a point
    not finite or outside the image, fewer than one cell."""
    maps.check_images([image])
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise PipelineError(None, "top", f"expected a whole number of cells >= 1, got {str(top)[:20]}")
    width, height = (int(maps.images.at[image, c]) for c in ("width", "height"))
    x, y = (float(v) for v in point)
    if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < width and 0 <= y < height):
        raise PipelineError(None, "point", f"({x:g}, {y:g}) is not inside image {image!r} "
                            f"(x in [0, {width}), y in [0, {height}))")


def index_path(maps: StoreMaps, layer: str, timestep: int, transform: str) -> Path:
    """`<user cache>/search/<store name>-<fingerprint>/<layer>@<timestep>@<transform>.faiss` (transform specs
    made file-name safe)."""
    safe = transform.replace(":", "-").replace(",", "_").replace("+", "_")
    return user_cache() / "search" / f"{maps.name}-{maps.fingerprint[:16]}" / f"{layer}@{timestep}@{safe}.faiss"


def trim_cache(folder: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Remove the least recently used indexes under `folder` until they take at most `limit` bytes (default
    CACHE_LIMIT_BYTES; never `keep`); the removed indexes."""
    limit = CACHE_LIMIT_BYTES if limit is None else limit
    indexes = []
    for path in folder.glob("*/*.faiss"):
        if path.name.startswith("."):  # being written
            continue
        files = [path, path.with_suffix(".cells.npy"), path.with_suffix(".json")]
        try:
            used = max(f.stat().st_mtime for f in files if f.exists())
            indexes.append((used, sum(f.stat().st_size for f in files if f.exists()), path, files))
        except FileNotFoundError:  # trimmed by another process meanwhile
            continue
    total = sum(size for _, size, _, _ in indexes)
    removed = []
    for _, size, path, files in sorted(indexes, key=lambda entry: entry[0]):
        if total <= limit:
            break
        if path == keep:
            continue
        for f in files:
            f.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed
