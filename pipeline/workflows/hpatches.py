"""HPatches homography estimation from the cache, DIFT's protocol: the dataset's images encoded and extracted
into their own stores (store/hpatches/), then every pair (image 1 against 2..6 of a sequence) matched at every
stored layer, timestep and transform, one row per pair and variant.

What the protocol does with a pair is pipeline/matching/homography.py; what its rows add up to,
pipeline/evaluation/homography.py. This module only connects the dataset, the stores and the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.cache.current import check_current
from pipeline.cache.encode import encode
from pipeline.cache.extract import extract
from pipeline.config import HPatchesParams, Params
from pipeline.data import hpatches
from pipeline.data.images import read_rgb
from pipeline.errors import PipelineError
from pipeline.matching.homography import match_pair, sample_descriptors
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import write_parquet_atomically

PAIR_COLUMNS = ["backbone", "layer", "timestep", "transform", "keypoints", "canvas", "metric", "method", "ransac_threshold",
                "sequence", "target", "kind", "keypoints_a", "keypoints_b", "matches", "inliers", "homography_found",
                "corner_error", "estimate"]


def dataset_attrs(dataset: HPatchesParams) -> dict:
    """What a store of HPatches images records as its dataset (the store contract, docs/reference/store.md)."""
    return {"name": "hpatches", "task": dataset.task, "root": dataset.root, "exclude": list(dataset.exclude)}


def extract_store(params: Params, name: str, replace: str = "never", client=None) -> Path:
    """Backbone `name`'s features of every HPatches image, in params.dataset_store("hpatches", name): the images
    through the backbone's encoder on the dataset's square canvas (a latents store shared by the backbones of that
    encoder), then the backbone as datasets.hpatches.backbones.<name> changes it. Both resume."""
    dataset = params.datasets.hpatches
    images = hpatches.images_table(Path(dataset.root), exclude=dataset.exclude)
    encoder = params.backbone(name).latents
    latents = encode(params.dataset_encoder("hpatches", name), images, dataset.root,
                     params.dataset_latents("hpatches", encoder), replace="outdated", dataset=dataset_attrs(dataset),
                     on_error="fail", check_disk=params.check_disk)
    return extract(params.dataset_backbone("hpatches", name), name, latents, params.dataset_store("hpatches", name),
                   replace=replace, client=client, on_error="fail", check_disk=params.check_disk)


def detect_sift(path: Path, count: int) -> np.ndarray:
    """OpenCV SIFT's `count` strongest points of an image, (N, 2) as (x, y): keypoints that need no weights,
    where DIFT's SuperPoint files are not at hand."""
    gray = cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2GRAY)
    points = cv2.SIFT_create(nfeatures=count).detect(gray, None)
    return np.array([p.pt for p in points], dtype=np.float64).reshape(-1, 2)


def keypoints(dataset: HPatchesParams, image: str, path: Path, width: int, height: int) -> np.ndarray:
    """An image's keypoints in its original pixels, as `datasets.hpatches.keypoints` says."""
    source, _, count = dataset.keypoints.partition(":")
    if source == "sift":
        return detect_sift(path, int(count))
    return hpatches.read_keypoints(hpatches.keypoint_file(Path(dataset.keypoint_files), image), width, height)


def match_store(params: Params, name: str, store_path: str | Path | None = None) -> pd.DataFrame:
    """Every pair at every stored layer x timestep x transform: a row each (PAIR_COLUMNS)."""
    dataset = params.datasets.hpatches
    root = Path(dataset.root)
    maps = StoreMaps(store_path or params.dataset_store("hpatches", name))
    pairs = hpatches.pairs(root, exclude=dataset.exclude)
    table = maps.images
    if maps.root.attrs.get("dataset", {}).get("name") != "hpatches":
        raise PipelineError(maps.path, "dataset", "not a store of HPatches images (extract it with the hpatches stage)")
    needed = sorted({f"{pair.sequence}/{k}" for pair in pairs for k in (1, pair.target)})
    maps.check_images(needed)
    points = {image: keypoints(dataset, image, root / f"{image}.ppm", int(table.at[image, "width"]),
                               int(table.at[image, "height"])) for image in needed}
    transforms = params.match.transforms_for(name)
    protocol = {"keypoints": dataset.keypoints, "canvas": maps.root.attrs.get("preprocessing", {}).get("canvas"),
                "metric": dataset.metric, "method": dataset.method, "ransac_threshold": dataset.ransac_threshold}
    by_sequence: dict[str, list] = {}
    for pair in pairs:
        by_sequence.setdefault(pair.sequence, []).append(pair)
    rows = []
    variants = [(layer, int(t), transform) for layer in maps.layers for t in maps.timesteps for transform in transforms]
    with tqdm(total=len(variants) * len(pairs), unit="pair", desc=f"hpatches {name}") as bar:
        for layer, timestep, transform in variants:
            for sequence, its_pairs in by_sequence.items():  # its six images' descriptors at a time
                descriptors = {}
                for image in [f"{sequence}/1"] + [f"{sequence}/{pair.target}" for pair in its_pairs]:
                    feature_map = maps.load(image, layer, timestep, transform)
                    descriptors[image] = sample_descriptors(feature_map.features, points[image], feature_map.width,
                                                            feature_map.height)
                a = f"{sequence}/1"
                for pair in its_pairs:
                    b = f"{sequence}/{pair.target}"
                    result = match_pair(descriptors[a], points[a], descriptors[b], points[b], pair.homography,
                                        int(table.at[a, "width"]), int(table.at[a, "height"]), dataset.metric,
                                        dataset.method, dataset.ransac_threshold)
                    rows.append({"backbone": name, "layer": layer, "timestep": timestep, "transform": transform, **protocol,
                                 "sequence": sequence, "target": pair.target, "kind": pair.kind,
                                 "keypoints_a": len(result["keypoints_a"]), "keypoints_b": len(result["keypoints_b"]),
                                 "matches": len(result["matches"]), "inliers": result["inliers"],
                                 "homography_found": result["homography_found"], "corner_error": result["corner_error"],
                                 "estimate": result["estimate"]})
                    bar.update()
    frame = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return frame


def match_to_file(params: Params, name: str, out: str | Path) -> Path:
    """The pair table of backbone `name`, written whole or not at all; a stale store is refused."""
    check_current(params.dataset_store("hpatches", name), params, allow_stale=False, anyway=None)
    frame = match_store(params, name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomically(frame, out)
    print(f"{out}: {len(frame)} pair results", file=sys.stderr)
    return out
