"""Latents store -> features store, one backbone run.

Per image and timestep, the ensemble members (each its own posterior sample and noise) go through
the model as one batch, in ONE forward pass that captures every requested layer and stops after the
deepest; the members' maps are averaged and stored as float16. Random draws depend only on
(seed, image, timestep), so a resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from pipeline import cluster
from pipeline.cache import store
from pipeline.models import hub
from pipeline.models.backbones import Parts, make_backbone
from pipeline.config import BackboneParams, check_policy
from pipeline.cache.encode import peak_memory
from pipeline.errors import PipelineError, report_skipped


def generator(seed: int, image: str, timestep: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{image}/{timestep}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
    key = json.dumps([asdict(params), hub.model_identity(params.model), latents_attrs["fingerprint"]], sort_keys=True)
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
            overwrite: bool = False, client=None, on_error: str = "fail", check_disk: bool = True) -> Path:
    """Fill the features store `out`; resumes where an interrupted run stopped.

    With a dask `client` (pipeline.cluster.connect), images are sharded across its workers, each
    writing its own images' chunks of the same store. `on_error: skip` records a failing image's
    reason in the store and goes on; `fail` stops at the first. Before any work, the images still to do
    must fit on the store's disk (`check_disk`; see pipeline/plan.py).
    """
    _check(params)
    check_policy(on_error)
    latents = open_latents(latents_path)
    latents_attrs = dict(latents.attrs)
    images = store.read_images(latents)
    categories = sorted(images["category"].unique())
    determinants = _determinants(params, latents_attrs)
    if check_disk:
        from pipeline import plan

        plan.check_store_fits(out, params, latents_attrs, store.pending_count(out, determinants, len(images)))
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
        "layers": params.layers, "timesteps": params.timesteps, "determinants": determinants,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")},
    }
    with store.writer_lock(out), store.writing(out):
        root = store.open_store(out, attrs, images[["image", *store.IMAGE_COLUMNS]], params.timesteps, overwrite)
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


def _determinants(params: BackboneParams, latents_attrs: dict) -> dict:
    """Everything that decides a features store's contents (not where it ran)."""
    determinants = {**asdict(params), "model_identity": hub.model_identity(params.model),
                    "latents": latents_attrs["fingerprint"], "schema_version": store.SCHEMA_VERSION}
    for where_it_runs in ("device", "offload"):
        determinants.pop(where_it_runs)
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
    skipped = []
    for index in indices:
        image, category = images["image"].iloc[index], images["category"].iloc[index]
        start = time.perf_counter()
        if backbone.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(backbone.device)
        try:
            if not images["done"].iloc[index]:
                raise PipelineError(latents_path, image, f"not encoded ({images['error'].iloc[index] or 'pending'})")
            mean = torch.from_numpy(mean_array[index]).permute(2, 0, 1)
            std = torch.from_numpy(std_array[index]).permute(2, 0, 1)
            maps = _image_maps(params, backbone, image, category, mean, std, out)
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


def layer_tensors(params: BackboneParams, backbone, image: str, category: str, mean: torch.Tensor,
                  std: torch.Tensor, t: int) -> dict[tuple[str, str], torch.Tensor]:
    """(layer, array) -> that array of one image at timestep t, averaged over the ensemble, on the
    backbone's device: ONE forward pass for every layer. `mean`, `std`: the posterior, (C, H, W)."""
    draws = generator(params.seed, image, t)
    shape = (params.ensemble, *mean.shape)
    posterior_eps = torch.randn(shape, generator=draws)
    noise_eps = torch.randn(shape, generator=draws)
    z = mean + std * posterior_eps if params.latent == "sample" else mean.expand(shape)
    x0 = backbone.model_latent(z)
    x = backbone.noised(x0, noise_eps, t) if params.noise else x0
    outputs = backbone.run(x.to(backbone.device, backbone.dtype), t, category)
    return {(layer, array): value.float().mean(0) for layer, arrays in outputs.items() for array, value in arrays.items()}


FLOAT16_MAX = float(np.finfo(np.float16).max)


def as_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """float16 for the store, and how many finite values lay beyond its range (+-65504): those are
    stored as +-65504, never as inf. Massive activations of diffusion transformers computed in bfloat16
    or float32 can reach that far."""
    overflow = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), overflow


def _image_maps(params, backbone, image: str, category: str, mean, std, out) -> dict:
    """Every requested array of one image, per timestep, as float16; plus per layer the count of values
    clipped to float16's range ("overflow")."""
    maps: dict[tuple[str, str], list] = {}
    for t in params.timesteps:
        overflow: dict[str, int] = {}
        for (layer, array), value in layer_tensors(params, backbone, image, category, mean, std, t).items():
            values = value.cpu().numpy()
            if not np.isfinite(values).all():
                raise PipelineError(out, f"{layer}/{array}", f"non-finite values for image {image!r} at t={t} "
                                    "(NaN or inf from the model)")
            stored, clipped = as_float16(values)
            overflow[layer] = overflow.get(layer, 0) + clipped
            maps.setdefault((layer, array), []).append(stored)
        for layer, count in overflow.items():
            maps.setdefault((layer, "overflow"), []).append(np.int64(count))
    return {key: np.stack(values) for key, values in maps.items()}


def _write(root, params: BackboneParams, backbone, index: int, maps: dict, canvas: int) -> None:
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
            {**backbone.layer_attrs(layer), "stride": stride},
        )
        for array in arrays:
            node[array][index] = maps[(layer, array)]
