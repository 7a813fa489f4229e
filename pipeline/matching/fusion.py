"""Fusion at match time (the SD+DINO recipe), without re-extraction: for each store a layer and a
timestep; each map L2-normalised per cell, resampled to the finest grid among them (bilinear,
align_corners=False), weighted, and concatenated along channels. Matching then proceeds as for one
store. The stores must place every image identically on their canvases (same valid regions).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.matching.maps import StoreMaps
from pipeline.matching.protocols import FeatureMap


class FusedMaps:
    """Looks like StoreMaps to `match_store`: one fused layer, one timestep."""

    def __init__(self, paths: list[str | Path], layers: list[str], timesteps: list[int], weights: list[float]):
        if not (len(paths) == len(layers) == len(timesteps) == len(weights)) or len(paths) < 2:
            raise PipelineError(None, "fusion", "give at least two stores, and one layer, timestep and weight per store")
        self.arguments = (list(paths), list(layers), list(timesteps), list(weights))
        self.parts = [StoreMaps(path) for path in paths]
        for maps, layer, timestep in zip(self.parts, layers, timesteps):
            maps.check_variant(layer, timestep)
        self.layers_of, self.timesteps_of, self.weights = list(layers), list(timesteps), list(weights)
        self.name = "+".join(f"{maps.name}*{w:g}" for maps, w in zip(self.parts, weights))
        self.layers = ["+".join(layers)]
        self.timesteps = [timesteps[0]] if len(set(timesteps)) == 1 else [-1]
        self.images = self.parts[0].images
        self.path = self.parts[0].path
        self.fingerprint = "+".join(maps.fingerprint for maps in self.parts)
        self.load = lru_cache(maxsize=8)(self._load)

    def __reduce__(self):
        return FusedMaps, self.arguments

    def check_images(self, keys) -> None:
        keys = list(keys)
        for maps in self.parts:
            maps.check_images(keys)
            for key in keys:
                mine, first = maps.images.loc[key], self.images.loc[key]
                region = ["valid_x0", "valid_y0", "valid_x1", "valid_y1"]
                if list(mine[region]) != list(first[region]):
                    raise PipelineError(maps.path, "images/valid", f"image {key!r} lies differently on this store's "
                                        "canvas; fuse stores encoded with the same canvas mode")

    def massive(self, layer: str, timestep: int) -> tuple[int, ...]:
        return ()

    def dropped(self, layer: str, timestep: int, spec: str) -> str:
        return ";".join(maps.dropped(part, t, spec) for maps, part, t in zip(self.parts, self.layers_of, self.timesteps_of))

    def source(self, image: str, layer: str, timestep: int, transform: str = "raw"):
        """As StoreMaps.source: here the fused map, already transformed."""
        return self.load(image, layer, timestep, transform), None

    def _load(self, image: str, layer: str, timestep: int, transform: str = "raw") -> FeatureMap:
        maps = [m.load(image, part, t, transform) for m, part, t in zip(self.parts, self.layers_of, self.timesteps_of)]
        grid = max(m.features.shape[0] for m in maps), max(m.features.shape[1] for m in maps)
        blocks = []
        for feature_map, weight in zip(maps, self.weights):
            x = feature_map.features / np.maximum(np.linalg.norm(feature_map.features, axis=-1, keepdims=True), 1e-12)
            if x.shape[:2] != grid:
                resized = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=grid, mode="bilinear",
                                        align_corners=False)
                x = resized[0].permute(1, 2, 0).numpy()
            blocks.append(weight * x)
        first = maps[0]
        stride = first.stride * first.features.shape[0] / grid[0]
        return FeatureMap(np.concatenate(blocks, axis=-1).astype(np.float32), first.width, first.height,
                          first.valid_x1, first.valid_y1, stride, first.valid_x0, first.valid_y0)
