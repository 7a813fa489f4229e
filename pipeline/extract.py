"""Latents store -> features store, one backbone run.

Per image and timestep, the ensemble members (each its own posterior sample and noise) go through
the model as one batch, in ONE forward pass that captures every requested layer and stops after the
deepest; the members' maps are averaged and stored as float16. Random draws depend only on
(seed, image, timestep), so a resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from pipeline import hub, store
from pipeline.backbones import make_backbone
from pipeline.config import BackboneParams
from pipeline.encode import peak_memory
from pipeline.errors import PipelineError


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
    pending = int((~store.done_mask(latents)).sum())
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


def extract(params: BackboneParams, name: str, latents_path: str | Path, out: str | Path,
            overwrite: bool = False, limit: int | None = None) -> Path:
    """Fill the features store `out`; resumes where an interrupted run stopped.

    `limit` stops after that many newly finished images (for tests and benchmarks).
    """
    _check(params)
    latents = open_latents(latents_path)
    latents_attrs = dict(latents.attrs)
    device = hub.resolve_device(params.device)
    dtype = hub.resolve_dtype(params.dtype, device)
    backbone = make_backbone(params, latents_attrs, device, dtype)
    backbone.check_layers(params.layers)

    images = store.read_images(latents)
    determinants = {**asdict(params), "model_identity": hub.model_identity(params.model),
                    "latents": latents_attrs["fingerprint"]}
    determinants.pop("device")
    attrs = {
        "kind": "features", "name": name, "backbone": params.kind, "model": params.model,
        "preprocessing": {"canvas": latents_attrs["canvas"], "canvas_mode": latents_attrs["canvas_mode"],
                          "latents_store": str(latents_path)},
        "prompt": params.prompt, "ensemble": params.ensemble, "seed": params.seed, "latent": params.latent,
        "noise": params.noise, "dtype": params.dtype, "device": str(device), "dataset": latents_attrs["dataset"],
        "layers": params.layers, "timesteps": params.timesteps, "determinants": determinants,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")},
    }
    root = store.open_store(out, attrs, images[["image", *store.IMAGE_COLUMNS]], params.timesteps, overwrite)

    mean_array, std_array = latents["posterior/mean"], latents["posterior/std"]
    canvas = latents_attrs["canvas"]
    done = store.done_mask(root)
    finished = 0
    with tqdm(total=len(images), initial=int(done.sum()), unit="img", desc=f"extract {name}") as bar:
        for index in np.flatnonzero(~done):
            if limit is not None and finished >= limit:
                break
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            image, category = images["image"].iloc[index], images["category"].iloc[index]
            mean = torch.from_numpy(mean_array[index]).permute(2, 0, 1)
            std = torch.from_numpy(std_array[index]).permute(2, 0, 1)
            maps: dict[tuple[str, str], list[np.ndarray]] = {}
            for t in params.timesteps:
                draws = generator(params.seed, image, t)
                shape = (params.ensemble, *mean.shape)
                posterior_eps = torch.randn(shape, generator=draws)
                noise_eps = torch.randn(shape, generator=draws)
                z = mean + std * posterior_eps if params.latent == "sample" else mean.expand(shape)
                x0 = backbone.model_latent(z)
                x = backbone.noised(x0, noise_eps, t) if params.noise else x0
                outputs = backbone.run(x.to(device, dtype), t, category)
                for layer, arrays in outputs.items():
                    for array, value in arrays.items():
                        maps.setdefault((layer, array), []).append(value.float().mean(0).cpu().numpy())
            for layer in params.layers:
                features = np.stack(maps[(layer, "features")])  # (timestep, y, x, channel)
                _, h, w, c = features.shape
                stride = canvas / h
                arrays = {"features": (("timestep", "y", "x", "channel"), features.shape)}
                if (layer, "shift") in maps:
                    arrays |= {"shift": (("timestep", "channel"), (len(params.timesteps), c)),
                               "scale": (("timestep", "channel"), (len(params.timesteps), c))}
                node = store.ensure_layer(
                    root, layer, arrays,
                    {"y": (np.arange(h) + 0.5) * stride, "x": (np.arange(w) + 0.5) * stride, "channel": np.arange(c)},
                    {**backbone.layer_attrs(layer), "stride": stride},
                )
                for array in arrays:
                    node[array][index] = np.stack(maps[(layer, array)]).astype(np.float16)
            store.mark_done(root, index, time.perf_counter() - start, peak_memory(device))
            finished += 1
            bar.update()
    store.finish(root)
    return Path(out)
