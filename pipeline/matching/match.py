"""Predictions from a features store: every pair x source keypoint x layer x timestep x transform x protocol.

Streams one target image at a time: its map is read, transformed and prepared once per variant, and the
keypoints of every pair that uses it are matched in one batch (pipeline.matching.protocols), on the CPU or
a GPU. Of each source map only the cells under its keypoints are transformed; raw maps come through a
small cache, so memory stays at a few maps whatever the dataset size.

Coverage travels with the predictions: the table's parquet metadata (and a DataFrame's `attrs`) hold,
under `dift_cache.coverage`, the split's pair count per category and every pair skipped under
`on_error: skip` with its category and reason; PCK tables report scored pairs against it.

Rows of `geoaware` and `sd-dino` on a canvas that keeps aspect (`center`, `pad`) carry the target's frame
on it (`canvas_scale`, `canvas_x0`, `canvas_y0`; protocols.canvas_columns), with which
pipeline.evaluation.metrics judges them in canvas units, as GeoAware-SC and sd-dino do; pred_x and pred_y
are always in the target's original pixels.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import cluster
from pipeline.cache import store
from pipeline.matching import transforms
from pipeline.errors import PipelineError, report_skipped
from pipeline.models.hub import resolve_device
from pipeline.matching.maps import StoreMaps, selection
from pipeline.matching.protocols import canvas_columns, match_queries, prepare_target, source_queries
from pipeline.data.predictions import COVERAGE_KEY, bbox_threshold

TARGETS_PER_ROW_GROUP = 32


@dataclass(frozen=True)
class Plan:
    """What one match run computes: the variants, and the pairs grouped by target image."""

    layers: list
    timesteps: list
    protocols: list
    statistics: str  # none | basic | all (pipeline.config.STATISTICS)
    device: str
    transform_specs: list
    targets: list  # target image keys, sorted: the order of the predictions table
    skipped: list  # (pair, message) left out under on_error: skip
    coverage: dict  # the split's pairs per category, and the skipped ones with their reason (pipeline.data.predictions.COVERAGE_KEY)


def plan(maps, pairs: pd.DataFrame, layers=None, timesteps=None, protocols=("dift",), statistics: str = "basic",
         device: str = "cpu", transform_specs=("raw",), on_error: str = "fail") -> tuple[Plan, pd.DataFrame]:
    """Check the request against the store before any work; the plan and the pairs to match."""
    protocols = [protocols] if isinstance(protocols, str) else list(protocols)
    resolve_device(device)  # refuse cuda without a GPU before any work
    layers = selection(layers, maps.layers, "layer", maps.path)
    timesteps = selection([int(t) for t in timesteps or []], maps.timesteps, "timestep", maps.path)
    transform_specs = list(transform_specs or ["raw"])
    for spec in transform_specs:  # refuse a bad spec before any work
        if spec != (written := transforms.canonical(spec)):
            raise PipelineError(None, "transform", f"{spec!r} is spelled {written!r}: one spelling per transform, "
                                "as predictions and search indexes are named by it")
    skipped, keep, reasons = [], [], []
    for pair in pairs.itertuples(index=False):
        try:
            maps.check_images([pair.src_image, pair.trg_image])
            keep.append(True)
        except PipelineError as exc:
            if on_error != "skip":
                raise
            skipped.append((pair.filename, f"{pair.filename}: {exc}"))
            reasons.append([pair.filename, pair.category, str(exc)])
            keep.append(False)
    coverage = {"pairs": {str(k): int(v) for k, v in pairs["category"].value_counts().sort_index().items()},
                "skipped": reasons}
    pairs = pairs[np.array(keep, dtype=bool)] if len(pairs) else pairs
    targets = sorted(pd.unique(pairs["trg_image"]))
    return Plan(layers, timesteps, protocols, statistics, device, transform_specs, targets, skipped, coverage), pairs


def match_store(path, pairs: pd.DataFrame, layers=None, timesteps=None, protocols=("dift",), statistics: str = "basic",
                device: str = "cpu", transform_specs=("raw",), client=None, on_error: str = "fail") -> pd.DataFrame:
    """The predictions table (see pipeline.evaluation.metrics) for every pair, keypoint, layer, timestep and
    feature transform (see pipeline.matching.transforms), in memory. `path` is a store, or maps already opened
    (StoreMaps, or pipeline.matching.fusion.FusedMaps). For a resumable run into a file, see `match_to_file`."""
    maps = path if hasattr(path, "load") else StoreMaps(path)
    request, pairs = plan(maps, pairs, layers, timesteps, protocols, statistics, device, transform_specs, on_error)
    frames = dict(_run(maps, request, pairs, request.targets, client))
    report_skipped(maps.path, request.skipped)
    predictions = pd.concat([frames[t] for t in request.targets], ignore_index=True)
    predictions.attrs[COVERAGE_KEY] = request.coverage
    return predictions


def match_to_file(path, pairs: pd.DataFrame, out: str | Path, layers=None, timesteps=None, protocols=("dift",),
                  statistics: str = "basic", device: str = "cpu", transform_specs=("raw",), client=None,
                  on_error: str = "fail") -> Path:
    """Like `match_store`, into the parquet table `out`, and resumable: each target image's rows are
    saved to `<out>.parts/` as soon as they exist (written to a temporary name, then renamed), so a
    killed run loses at most the targets in flight and a re-run computes only the missing ones.
    The table is assembled from the parts in target order (a row group per 32 targets), then
    renamed into place: `out` is complete or absent, never half-written, never duplicated."""
    maps = path if hasattr(path, "load") else StoreMaps(path)
    request, pairs = plan(maps, pairs, layers, timesteps, protocols, statistics, device, transform_specs, on_error)
    out = Path(out)
    with store.writing(out):
        _write_parts_and_table(maps, request, pairs, out, client)
    report_skipped(maps.path, request.skipped)
    return out


def _write_parts_and_table(maps, request: Plan, pairs: pd.DataFrame, out: Path, client) -> None:
    parts = _parts_folder(out, maps, request, pairs)
    files = {target: parts / f"{i:06d}.parquet" for i, target in enumerate(request.targets)}
    todo = [t for t in request.targets if not files[t].exists()]
    for target, frame in _run(maps, request, pairs, todo, client, initial=len(request.targets) - len(todo)):
        write_parquet_atomically(frame, files[target])
    writer, staging = None, out.with_name(f".{out.name}.partial")
    try:
        # A row group per TARGETS_PER_ROW_GROUP targets: the writer keeps every row group's metadata
        # until it closes, so one per target would grow with the dataset.
        for start in range(0, len(request.targets), TARGETS_PER_ROW_GROUP):
            batch = request.targets[start:start + TARGETS_PER_ROW_GROUP]
            table = pa.concat_tables([pq.read_table(files[target]) for target in batch])
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}),
                                                     COVERAGE_KEY.encode(): json.dumps(request.coverage).encode()})
                writer = pq.ParquetWriter(staging, schema, write_statistics=False)
            table = table.replace_schema_metadata(writer.schema.metadata)
            writer.write_table(table)
            pa.default_memory_pool().release_unused()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise PipelineError(out, None, "no pair left to match")
    os.replace(staging, out)
    shutil.rmtree(parts)


def _parts_folder(out: Path, maps, request: Plan, pairs: pd.DataFrame) -> Path:
    """`<out>.parts/`, emptied first if it holds parts of a run with other inputs."""
    parts = out.with_name(f"{out.name}.parts")
    key = store.fingerprint({"store": maps.fingerprint, "request": asdict(request) | {"skipped": None, "coverage": None},
                             "pairs": pd.util.hash_pandas_object(pairs[["filename", "src_image", "trg_image"]],
                                                                 index=False).tolist()})
    stamp = parts / "key"
    if parts.exists() and (not stamp.exists() or stamp.read_text() != key):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    return parts


def write_parquet_atomically(frame: pd.DataFrame, path: Path) -> None:
    staging = path.with_name(f".{path.name}.partial")
    frame.to_parquet(staging, index=False)
    os.replace(staging, path)


def _run(maps, request: Plan, pairs: pd.DataFrame, targets: list, client=None, initial: int = 0):
    """Yield (target image, its predictions) for `targets`: in this process, or in batches of
    target images on dask workers (each batch's pairs travel with it; its maps are read there)."""
    groups = dict(tuple(pairs.groupby("trg_image", sort=True)))
    total = len(request.targets)
    with tqdm(total=total, initial=initial, unit="target", desc=f"match {maps.name} ({', '.join(request.protocols)})") as bar:
        if client is None:
            for target in targets:
                yield target, _match_target(maps, request, groups[target])
                bar.update()
            return
        from distributed import as_completed  # distributed: seconds to import; only a dask client needs it

        batches = cluster.shards(targets, cluster.workers_of(client))
        remote_maps = client.scatter(maps, broadcast=True)
        futures = [client.submit(_match_batch, remote_maps, request, [groups[t] for t in batch], pure=False)
                   for batch in batches]
        try:
            for future in as_completed(futures):
                for target, frame in future.result():
                    yield target, frame
                    bar.update()
        except BaseException:
            client.cancel(futures)
            raise


def _match_batch(maps, request: Plan, groups: list[pd.DataFrame]) -> list[tuple[str, pd.DataFrame]]:
    return [(group["trg_image"].iloc[0], _match_target(maps, request, group)) for group in groups]


def _match_target(maps, request: Plan, group: pd.DataFrame) -> pd.DataFrame:
    """Every pair sharing one target image: per variant, the target is prepared once and every keypoint of
    every pair is matched in one batch."""
    target_image = group["trg_image"].iloc[0]
    pairs = list(group.itertuples(index=False))
    points = [np.array([list(p) for p in pair.src_kps], dtype=np.int64) for pair in pairs]
    ends = np.cumsum([len(p) for p in points])[:-1]
    device = cluster.worker_device(request.device)  # cuda:<rank> on a LocalCluster of GPU workers
    frames = []
    for layer in request.layers:
        for timestep in request.timesteps:
            for spec in request.transform_specs:
                target = maps.load(target_image, layer, timestep, spec)
                for protocol in request.protocols:
                    prepared = prepare_target(target, protocol, device)
                    queries = np.concatenate([source_queries(*maps.source(pair.src_image, layer, timestep, spec), p, protocol)
                                              for pair, p in zip(pairs, points)])
                    predicted, stats = match_queries(target, queries, protocol, request.statistics, device, prepared)
                    variant = {"backbone": maps.name, "layer": layer, "timestep": timestep, "protocol": protocol,
                               "transform": spec, "dropped_channels": maps.dropped(layer, timestep, spec)}
                    canvas = canvas_columns(target, protocol)
                    for pair, p, found, *values in zip(pairs, points, np.split(predicted, ends),
                                                       *(np.split(v, ends) for v in stats.values())):
                        frames.append(pair_rows(pair, p, found, dict(zip(stats, values)), variant, canvas))
    return pd.concat(frames, ignore_index=True)


def pair_rows(pair, points, predicted, stats, variant: dict, canvas: dict | None = None) -> pd.DataFrame:
    """One pair's rows of the predictions table (`pair`: a row of the pairs table). `canvas`: the target's
    frame for a protocol judged in canvas units (protocols.canvas_columns); None: NaN, judged in image pixels."""
    truth = np.array([list(p) for p in pair.trg_kps], dtype=np.float64)
    predicted = predicted.astype(np.float64)
    return pd.DataFrame({
        "split": pair.split, "pair": pair.filename, "category": pair.category,
        "src_image": pair.src_image, "trg_image": pair.trg_image, "keypoint": list(pair.kps_ids),
        "src_x": points[:, 0], "src_y": points[:, 1], "trg_x": truth[:, 0], "trg_y": truth[:, 1],
        "pred_x": predicted[:, 0], "pred_y": predicted[:, 1],
        "distance": np.hypot(predicted[:, 0] - truth[:, 0], predicted[:, 1] - truth[:, 1]),
        "threshold": bbox_threshold(list(pair.trg_bndbox)),
        "image_size": float(max(pair.trg_width, pair.trg_height)),
        **(canvas or {"canvas_scale": np.nan, "canvas_x0": np.nan, "canvas_y0": np.nan}),
        **variant, **stats,
    })
