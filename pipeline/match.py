"""Predictions from a features store: every pair x source keypoint x layer x timestep.

Streams one target image at a time (its map, its FAISS index and its norm map are built once and
shared by every pair that uses it); source maps come through a small cache, so memory stays at a
few maps whatever the dataset size.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from pipeline import store, transforms
from pipeline.errors import PipelineError
from pipeline.matching import FeatureMap, TargetIndex, match_dift, match_fast
from pipeline.metrics import bbox_threshold

PROTOCOLS = ("dift", "fast")


def _selection(requested, available, field: str, path) -> list:
    if not requested:
        return list(available)
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise PipelineError(path, field, f"unknown {field} {unknown[0]!r}; the store has {list(available)}")
    return list(requested)


class StoreMaps:
    """Feature maps of one store as `FeatureMap`s, read one (image, timestep) chunk at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = store.open_existing(path)
        if self.root.attrs.get("kind") != "features":
            raise PipelineError(path, "kind", "not a features store")
        self.images = store.read_images(self.root).set_index("image")
        self.position = {image: i for i, image in enumerate(self.images.index)}
        self.timesteps = [int(t) for t in self.root["timestep"][:]]
        self.layers = store.layers(self.root)
        self.name = self.root.attrs.get("name", self.path.stem)
        self.load = lru_cache(maxsize=8)(self._load)
        self.massive = lru_cache(maxsize=None)(self._massive)

    def check_images(self, keys) -> None:
        for key in keys:
            if key not in self.position:
                raise PipelineError(self.path, "image", f"store has no image {key!r} (built for another split?)")
            if not self.images.at[key, "done"]:
                raise PipelineError(self.path, "images/done", f"image {key!r} is not extracted yet; resume extraction")

    def raw(self, image: str, layer: str, timestep: int) -> np.ndarray:
        features = self.root[layer]["features"][self.position[image], self.timesteps.index(timestep)]
        features = features.astype(np.float32)
        if not np.isfinite(features).all():
            raise PipelineError(self.path, f"{layer}/features", f"non-finite values for image {image!r}")
        return features

    def dropped(self, layer: str, timestep: int, spec: str) -> str:
        """The channels `drop:auto` zeroes for this variant, as recorded in predictions."""
        return ",".join(map(str, self.massive(layer, timestep))) if "drop:auto" in spec else ""

    def _massive(self, layer: str, timestep: int, sample: int = 16) -> tuple[int, ...]:
        """Massive channels of a layer at a timestep, from its first `sample` images."""
        done = [image for image in self.images.index if self.images.at[image, "done"]][:sample]
        stacked = np.stack([self.raw(image, layer, timestep) for image in done])
        return transforms.massive_channels(transforms.channel_magnitudes(stacked))

    def _load(self, image: str, layer: str, timestep: int, transform: str = "raw") -> FeatureMap:
        node = self.root[layer]
        features = self.raw(image, layer, timestep)
        steps = transforms.parse(transform)
        if steps:
            index, t = self.position[image], self.timesteps.index(timestep)
            has_modulation = "shift" in node and "scale" in node
            shift = node["shift"][index, t].astype(np.float32) if has_modulation else None
            scale = node["scale"][index, t].astype(np.float32) if has_modulation else None
            try:
                features = transforms.apply(steps, features, self.massive(layer, timestep), shift, scale)
            except PipelineError as exc:
                raise PipelineError(self.path, f"{layer}: transform {transform}", exc.reason) from None
        row = self.images.loc[image]
        return FeatureMap(features, int(row["width"]), int(row["height"]), float(row["valid_x1"]),
                          float(row["valid_y1"]), float(node.attrs["stride"]))


def match_store(path, pairs: pd.DataFrame, layers=None, timesteps=None, protocol: str = "dift",
                top_k: int = 10, transform_specs=("raw",)) -> pd.DataFrame:
    """The predictions table (see pipeline.metrics) for every pair, keypoint, layer, timestep and
    feature transform (see pipeline.transforms). `path` is a store, or maps already opened
    (StoreMaps, or pipeline.fusion.FusedMaps)."""
    if protocol not in PROTOCOLS:
        raise PipelineError(None, "protocol", f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    maps = path if hasattr(path, "load") else StoreMaps(path)
    layers = _selection(layers, maps.layers, "layer", path)
    timesteps = _selection([int(t) for t in timesteps or []], maps.timesteps, "timestep", path)
    maps.check_images(pd.unique(pd.concat([pairs["src_image"], pairs["trg_image"]])))
    transform_specs = list(transform_specs or ["raw"])
    for spec in transform_specs:
        transforms.parse(spec)  # refuse a bad spec before any work

    frames = []
    total = len(pairs) * len(layers) * len(timesteps) * len(transform_specs)
    with tqdm(total=total, unit="pair", desc=f"match {maps.name} ({protocol})") as bar:
        for target_image, group in pairs.groupby("trg_image", sort=True):
            for layer in layers:
                for timestep in timesteps:
                    for spec in transform_specs:
                        target = maps.load(target_image, layer, timestep, spec)
                        index = TargetIndex(target) if protocol == "fast" else None
                        dropped = maps.dropped(layer, timestep, spec)
                        variant = {"backbone": maps.name, "layer": layer, "timestep": timestep, "protocol": protocol,
                                   "transform": spec, "dropped_channels": dropped}
                        for pair in group.itertuples(index=False):
                            source = maps.load(pair.src_image, layer, timestep, spec)
                            points = np.array([list(p) for p in pair.src_kps], dtype=np.int64)
                            if protocol == "dift":
                                predicted, stats = match_dift(source, target, points)
                            else:
                                predicted, stats = match_fast(source, index, points, top_k)
                            frames.append(_rows(pair, points, predicted, stats, variant))
                            bar.update()
    return pd.concat(frames, ignore_index=True)


def _rows(pair, points, predicted, stats, variant: dict) -> pd.DataFrame:
    truth = np.array([list(p) for p in pair.trg_kps], dtype=np.float64)
    return pd.DataFrame({
        "split": pair.split, "pair": pair.filename, "category": pair.category,
        "src_image": pair.src_image, "trg_image": pair.trg_image, "keypoint": list(pair.kps_ids),
        "src_x": points[:, 0], "src_y": points[:, 1], "trg_x": truth[:, 0], "trg_y": truth[:, 1],
        "pred_x": predicted[:, 0], "pred_y": predicted[:, 1],
        "distance": np.hypot(predicted[:, 0] - truth[:, 0], predicted[:, 1] - truth[:, 1]),
        "threshold": bbox_threshold(list(pair.trg_bndbox)),
        **variant, **stats,
    })
