"""A features store read as feature maps: what matching, fusion, figures and the CLI read a store with.

Maps are read one (image, timestep) chunk at a time through a small cache; feature transforms
(pipeline/matching/transforms.py) are applied as they are read, to a whole map (`load`) or to the cells
matching reads of it (`source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.cache.store import FeatureStore
from pipeline.errors import CHECKSUM_MISMATCH, PipelineError
from pipeline.matching import transforms
from pipeline.matching.protocols import FeatureMap


@dataclass(frozen=True)
class Variant:
    """One map source: a store (its path, or its name where stores are already open), a layer, a timestep and
    a feature transform."""

    store: str
    layer: str
    timestep: int
    transform: str = "raw"

    def label(self, name: str | None = None) -> str:
        suffix = "" if self.transform == "raw" else f" {self.transform}"
        return f"{name or self.store} {self.layer} t={self.timestep}{suffix}"


def selection(requested, available, field: str, path) -> list:
    if not requested:
        return list(available)
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise PipelineError(path, field, f"unknown {field} {unknown[0]!r}; the store has {list(available)}")
    return list(requested)


class StoreMaps:
    """Feature maps of one store as `FeatureMap`s, read one (image, timestep) chunk at a time."""

    def __init__(self, path: str | Path):
        self.store = FeatureStore.open(path)
        if self.store.kind != "features":
            raise PipelineError(path, "kind", "not a features store")
        self.path, self.root = self.store.path, self.store.root
        self.images = self.store.images().set_index("image")
        self.position = {image: i for i, image in enumerate(self.images.index)}
        self.timesteps = self.store.timesteps()
        self.layers = self.store.layers()
        self.name = self.root.attrs.get("name", Path(str(self.path)).stem)
        self.fingerprint = self.store.fingerprint
        self.load = lru_cache(maxsize=8)(self._load)
        self.raw_map = lru_cache(maxsize=16)(self._raw_map)
        self.massive = lru_cache(maxsize=None)(self._massive)

    def __reduce__(self):
        # Shipped to dask workers as its path: each worker opens the store itself.
        return type(self), (self.path,)

    def check_variant(self, layer: str, timestep: int) -> None:
        """Refuse a layer or timestep the store does not have, in one line."""
        selection([layer], self.layers, "layer", self.path)
        selection([int(timestep)], self.timesteps, "timestep", self.path)

    def image_key_for(self, path: str | Path) -> str:
        """The store's image key (`<category>/<name>`) of an image file in the SPair layout
        (`JPEGImages/<category>/<name>.jpg`)."""
        path = Path(path)
        key = f"{path.parent.name}/{path.stem}"
        if key not in self.position:
            raise PipelineError(path, "image", f"store {self.path} has no image {key!r} "
                                               "(expected JPEGImages/<category>/<name>.* of the store's split)")
        return key

    def check_images(self, keys) -> None:
        for key in keys:
            if key not in self.position:
                raise PipelineError(self.path, "image", f"store has no image {key!r} (built for another split?)")
            if self.images.at[key, "error"]:
                raise PipelineError(self.path, "images/error", f"image {key!r} was skipped: {self.images.at[key, 'error']}")
            if not self.images.at[key, "done"]:
                raise PipelineError(self.path, "images/done", f"image {key!r} is not extracted yet; resume extraction")

    def read(self, layer: str, array: str, image: str, timestep: int) -> np.ndarray:
        """One image's chunk of a layer's array at a timestep, as stored; a damaged chunk is a one-line error
        naming it, never a value."""
        node = self.root[layer][array]
        at = (self.position[image], self.timesteps.index(timestep))
        key = node.metadata.encode_chunk_key(at + (0,) * (node.ndim - 2))
        try:
            values = node[at]
        except ValueError as exc:
            if not str(exc).startswith(CHECKSUM_MISMATCH):
                raise
            raise PipelineError(self.path, f"{node.path}/{key}", f"damaged chunk of image {image!r} (checksum mismatch); "
                                "`cli.py verify` lists every damaged chunk, `cli.py extract` computes their images "
                                "again") from None
        if values.dtype.kind == "f" and np.isnan(values).all():  # NaN, the fill value: the chunk is not there
            raise PipelineError(self.path, f"{node.path}/{key}", f"missing chunk of image {image!r} (never written, or "
                                "deleted); `cli.py verify` checks the store, `cli.py extract` computes such images again")
        return values

    def raw(self, image: str, layer: str, timestep: int) -> np.ndarray:
        features = self.read(layer, "features", image, timestep).astype(np.float32)
        if not np.isfinite(features).all():
            raise PipelineError(self.path, f"{layer}/features", f"non-finite values for image {image!r}; `cli.py verify` "
                                                                 "checks the store, `cli.py extract` computes such images again")
        return features

    def dropped(self, layer: str, timestep: int, spec: str) -> str:
        """The channels `drop:auto` zeroes for this variant, as recorded in predictions."""
        return ",".join(map(str, self.massive(layer, timestep))) if "drop:auto" in spec else ""

    def _massive(self, layer: str, timestep: int, sample: int = 16) -> tuple[int, ...]:
        """Massive channels of a layer at a timestep, from its first `sample` images."""
        done = [image for image in self.images.index if self.images.at[image, "done"]][:sample]
        stacked = np.stack([self.raw(image, layer, timestep) for image in done])
        return transforms.massive_channels(transforms.channel_magnitudes(stacked))

    def source(self, image: str, layer: str, timestep: int, transform: str = "raw"):
        """A source map as matching reads it: (the raw map, the transform of its cells or None), so that
        only the cells under the keypoints are transformed."""
        return self.raw_map(image, layer, timestep), self._cell_transform(image, layer, timestep, transform)

    def _raw_map(self, image: str, layer: str, timestep: int) -> FeatureMap:
        row = self.images.loc[image]
        return FeatureMap(self.raw(image, layer, timestep), int(row["width"]), int(row["height"]),
                          float(row["valid_x1"]), float(row["valid_y1"]), float(self.root[layer].attrs["stride"]),
                          float(row["valid_x0"]), float(row["valid_y0"]))

    def _cell_transform(self, image: str, layer: str, timestep: int, transform: str):
        """(..., C) cells -> transformed cells, for this image's variant; None for `raw`."""
        steps = transforms.parse(transform)
        if not steps:
            return None
        node = self.root[layer]
        has_modulation = "shift" in node and "scale" in node
        shift = self.read(layer, "shift", image, timestep).astype(np.float32) if has_modulation else None
        scale = self.read(layer, "scale", image, timestep).astype(np.float32) if has_modulation else None
        massive = self.massive(layer, timestep)

        def apply(cells: np.ndarray) -> np.ndarray:
            try:
                return transforms.apply(steps, cells, massive, shift, scale)
            except PipelineError as exc:
                raise PipelineError(self.path, f"{layer}: transform {transform}", exc.reason) from None
        return apply

    def _load(self, image: str, layer: str, timestep: int, transform: str = "raw") -> FeatureMap:
        raw, apply = self.source(image, layer, timestep, transform)
        if apply is None:
            return raw
        return FeatureMap(apply(raw.features), raw.width, raw.height, raw.valid_x1, raw.valid_y1, raw.stride,
                          raw.valid_x0, raw.valid_y0)
