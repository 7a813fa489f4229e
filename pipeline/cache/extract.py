"""Latents store -> features store, one backbone run: the loop over images (resumable, sharded on dask
workers, skipping bad images under `on_error: skip`) around pipeline/cache/features.py, which computes
each image's arrays.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from pipeline import cluster
from pipeline.cache import codecs, features, store
from pipeline.cache.encode import peak_memory
from pipeline.cache.features import image_maps
from pipeline.cache.provenance import code_identities, model_identity
from pipeline.config import BackboneParams, check_policy
from pipeline.errors import PipelineError, report_skipped
from pipeline.models import hub
from pipeline.models.backbones import Parts, backbone_class, make_backbone


def open_latents(path: str | Path) -> zarr.Group:
    path = Path(path)
    try:
        latents = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001
        raise PipelineError(path, None, "latents store is missing or unreadable; run the encode stage first") from None
    if latents.attrs.get("kind") != "latents":
        raise PipelineError(path, "kind", "not a latents store")
    table = store.read_images(latents)
    pending = int((~table["done"] & (table["error"] == "")).sum())
    if pending:
        raise PipelineError(path, "images/done", f"{pending} images not encoded yet; finish the encode stage first")
    return latents


def _check(params: BackboneParams) -> None:
    if params.latent not in ("sample", "mean"):
        raise PipelineError("params.yaml", "latent", f"expected sample or mean, got {params.latent!r}")
    if params.ensemble < 1:
        raise PipelineError("params.yaml", "ensemble", f"expected >= 1, got {params.ensemble}")
    if not params.timesteps or not all(0 <= t <= 1000 for t in params.timesteps):
        raise PipelineError("params.yaml", "timesteps", f"expected values in 0..1000, got {params.timesteps}")


_backbones: dict[str, object] = {}


def _backbone(params: BackboneParams, latents_attrs: dict, categories: list[str]):
    """The loaded backbone, once per process: a dask worker keeps its model between shards."""
    key = json.dumps([asdict(params), model_identity(params.model), latents_attrs["fingerprint"]], sort_keys=True)
    if key not in _backbones:
        _backbones.clear()  # one model per process at a time
        device = hub.resolve_device(cluster.worker_device(params.device))
        parts = Parts(params.model, device, hub.resolve_dtype(params.dtype, device), params.offload)
        backbone = make_backbone(params, latents_attrs, parts, categories)
        backbone.check_layers(params.layers)
        _backbones[key] = backbone
    return _backbones[key]


def _backbone_loads(params: BackboneParams, latents_attrs: dict, categories: list[str]) -> bool:
    _backbone(params, latents_attrs, categories)
    return True


def extract(params: BackboneParams, name: str, latents_path: str | Path, out: str | Path,
            replace: str = "never", client=None, on_error: str = "fail", check_disk: bool = True,
            only: list[str] | None = None) -> Path:
    """Fill the features store `out`; resumes where an interrupted run stopped.

    With a dask `client` (pipeline.cluster.connect), images are sharded across its workers, each
    writing its own images' chunks of the same store. `on_error: skip` records a failing image's
    reason in the store and goes on; `fail` stops at the first. Before any work, the images still to do
    must fit on the store's disk (`check_disk`; see pipeline/cache/sizes.py). `only`: these images of the
    latents store, not all (pipeline/cache/fidelity.py's float16 reference).
    """
    _check(params)
    codecs.check_storage(params.storage, name)
    check_policy(on_error)
    latents = open_latents(latents_path)
    latents_attrs = dict(latents.attrs)
    images = store.read_images(latents)
    categories = sorted(images["category"].unique())
    if only is not None:
        images = images[images["image"].isin(only)].reset_index(drop=True)
    determinants = _determinants(params, latents_attrs) | ({"only": sorted(only)} if only is not None else {})
    if check_disk:
        from pipeline.cache import sizes

        sizes.check_store_fits(out, params, latents_attrs, store.pending_count(out, determinants, len(images)))
    if client is None:
        _backbone(params, latents_attrs, categories)  # refuse unknown layers before touching the store
    else:
        client.submit(_backbone_loads, params, latents_attrs, categories, pure=False).result()

    attrs = {
        "kind": "features", "name": name, "backbone": params.kind, "model": params.model,
        "preprocessing": {"canvas": latents_attrs["canvas"], "canvas_mode": latents_attrs["canvas_mode"],
                          "latents_store": str(latents_path)},
        "prompt": params.prompt, "ensemble": params.ensemble, "seed": params.seed, "latent": params.latent,
        "noise": params.noise, "dtype": params.dtype, "device": params.device, "dataset": latents_attrs["dataset"],
        "layers": params.layers, "timesteps": params.timesteps, "storage": params.storage, "determinants": determinants,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")},
    }
    with store.writer_lock(out), store.writing(out):
        root = store.open_store(out, attrs, images[["image", *store.IMAGE_COLUMNS]], params.timesteps, replace)
        pending = [int(i) for i in np.flatnonzero(~store.done_mask(root))]
        job = (params, str(latents_path), str(out), on_error)
        skipped = []
        with tqdm(total=len(images), initial=len(images) - len(pending), unit="img", desc=f"extract {name}") as bar:
            if client is None:
                skipped = _extract_images(*job, pending, progress=bar.update)
            else:
                skipped = _extract_distributed(client, job, root, pending, bar)
        store.finish(root)
    report_skipped(out, skipped)
    return Path(out)


def feature_modules(kind: str) -> list:
    """The modules whose code computes a `kind`'s stored values: the per-image arrays (pipeline.cache.features)
    and the backbone's class and its bases (e.g. pipeline.models.backbones.sd3 and pipeline.models.backbones)."""
    classes = [cls for cls in backbone_class(kind).__mro__ if cls.__module__.startswith("pipeline.")]
    return [features, *dict.fromkeys(sys.modules[cls.__module__] for cls in classes)]


def _determinants(params: BackboneParams, latents_attrs: dict) -> dict:
    """Everything that decides a features store's contents (not where it ran): parameters, the model's
    identity, the latents store, the store layout and the code (pipeline/cache/provenance.py)."""
    determinants = {**asdict(params), "model_identity": model_identity(params.model),
                    "latents": latents_attrs["fingerprint"], "schema_version": store.SCHEMA_VERSION,
                    **code_identities(feature_modules(params.kind))}
    for where_it_runs in ("device", "offload"):
        determinants.pop(where_it_runs)
    if params.storage == "float16":
        determinants.pop("storage")  # the default: stores extracted before the knob existed keep their fingerprint
    else:  # the codec's code decides the stored values too
        determinants.update(code_identities([codecs]))
    return determinants


def expected_fingerprint(params: BackboneParams, latents_path: str | Path) -> str:
    """The fingerprint a store extracted with `params` from `latents_path` would have."""
    return store.fingerprint(_determinants(params, dict(open_latents(latents_path).attrs)))


def _extract_distributed(client, job, root, pending: list[int], bar) -> list[tuple[str, str]]:
    from distributed import as_completed

    skipped = []
    # The first finished image lays out every layer's arrays; then workers only write chunks.
    while pending and not all(layer in root for layer in job[0].layers):
        skipped += client.submit(_extract_images, *job, pending[:1], pure=False).result()
        pending = pending[1:]
        bar.update()
    futures = {client.submit(_extract_images, *job, shard, pure=False): len(shard)
               for shard in cluster.shards(pending, cluster.workers_of(client), per_worker=8)}
    try:
        for future in as_completed(futures):
            skipped += future.result()
            bar.update(futures[future])
    except BaseException:
        client.cancel(list(futures))
        raise
    return skipped


def _extract_images(params: BackboneParams, latents_path: str, out: str, on_error: str, indices: list[int],
                    progress=None) -> list[tuple[str, str]]:
    """Extract images `indices` into the open store `out`; the (image, reason) pairs skipped."""
    latents = zarr.open_group(latents_path, mode="r")
    latents_attrs = dict(latents.attrs)
    images = store.read_images(latents)
    backbone = _backbone(params, latents_attrs, sorted(images["category"].unique()))
    root = zarr.open_group(out, mode="r+", use_consolidated=False)
    mean_array, std_array = latents["posterior/mean"], latents["posterior/std"]
    # The store may hold some of the latents store's images (`only`): its rows are found by image key.
    in_latents = {image: i for i, image in enumerate(images["image"])}
    keys = root["image"][:]
    skipped = []
    for index in indices:
        source = in_latents[keys[index]]
        image, category = images["image"].iloc[source], images["category"].iloc[source]
        start = time.perf_counter()
        if backbone.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(backbone.device)
        try:
            if not images["done"].iloc[source]:
                raise PipelineError(latents_path, image, f"not encoded ({images['error'].iloc[source] or 'pending'})")
            mean = torch.from_numpy(mean_array[source]).permute(2, 0, 1)
            std = torch.from_numpy(std_array[source]).permute(2, 0, 1)
            maps = image_maps(params, backbone, image, category, mean, std, out)
            _write(root, params, backbone, index, maps, latents_attrs["canvas"])
            store.mark_done(root, index, time.perf_counter() - start, peak_memory(backbone.device))
        except PipelineError as exc:
            if on_error != "skip":
                raise
            store.mark_skipped(root, index, str(exc))
            skipped.append((image, str(exc)))
        if progress:
            progress()
    return skipped


def _write(root, params: BackboneParams, backbone, index: int, maps: dict, canvas: int) -> None:
    writes = []
    for layer in params.layers:
        features = maps[(layer, "features")]  # (timestep, y, x, channel)
        _, h, w, c = features.shape
        stride = canvas / h
        arrays = {"features": (("timestep", "y", "x", "channel"), features.shape),
                  "overflow": (("timestep",), (len(params.timesteps),), "int64")}
        if (layer, "shift") in maps:
            arrays |= {"shift": (("timestep", "channel"), (len(params.timesteps), c)),
                       "scale": (("timestep", "channel"), (len(params.timesteps), c))}
        node = store.ensure_layer(
            root, layer, arrays,
            {"y": (np.arange(h) + 0.5) * stride, "x": (np.arange(w) + 0.5) * stride, "channel": np.arange(c)},
            {**backbone.layer_attrs(layer), "stride": stride}, storage={"features": params.storage},
        )
        writes += [(node[array], maps[(layer, array)]) for array in arrays]
    store.write_image(index, writes)
