"""What a params file will cost, before the first GPU second (`python cli.py plan`).

- Stored bytes are exact: every backbone is built from its config files on the meta device (no
  weights, no memory) and run through the same capture path as extraction, which gives the shape of
  every stored array; times the stored dtype (float16 features, shift and scale; int64 overflow
  counts; float32 latents), or a lossy `storage`'s bytes (pca:K: with all EXACT_CHANNELS exact channels,
  an upper bound). Zarr's compression only lowers them.
- Downloads: the parameters of the components the stages load (pipeline/workflows/fetch.py), counted on the
  meta device, times the precision of the repository's weight files.
- GPU memory: the weights on the device at one time (text encoders, then the denoiser: never both)
  plus an activation estimate: the largest tensor an op produces in the meta forward, times the
  ensemble, times 3 (an op's input, its output and one temporary alive together). Attention kernels
  are fused on CUDA, so their score matrices are not counted.
- Time: FLOPs counted on the meta forward (torch's FlopCounterMode) over an effective rate: measured
  by `benchmarks/realsize.py` on the same device type (benchmarks/results/realsize-<device>.json), or
  else DIFT's published figure (203 ms per 768-px image on an A6000, SD2.1 to up_blocks.1, ensemble 8)
  applied as a FLOP rate; a lossy store's fit and fidelity samples count as images too. Matching: pairs
  x variants x the seconds per pair of benchmarks/match.py.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cache.codecs import STORAGE_CHOICES
from pipeline.cache.sizes import (ACTIVATION_FACTOR, LargestOutput, disk_free, human, latents_bytes_per_image,
                                  meta_run, parameters, stored_bytes, torch_dtype)
from pipeline.config import BackboneParams, EncoderParams, Params, is_lossy, parse_storage
from pipeline.demo import tiny_models
from pipeline.errors import PipelineError
from pipeline.models import hub, realsize
from pipeline.models.realsize import ConfigParts
from pipeline.workflows import fetch

DIFT_SECONDS = 0.203  # DIFT paper: SD2.1, 768 px, up_blocks.1, t=261, ensemble 8, one A6000
MATCH_SECONDS_PER_PAIR = 0.038  # fallback without benchmarks/results/match.json: the unbatched `dift`, 1280 x 48 x 48, 2 CPU cores
SPAIR_TEST_PAIRS_PER_IMAGE = 12234 / 1800  # SPair-71k test: 12,234 pairs over its 1,800 images


# ---- config files -------------------------------------------------------------------------------

def model_configs(model: str, params: Params | None = None) -> Path:
    """A folder of config files for `model` (a folder or hub id as backbones name it): the folder itself
    once it exists, else what its `models:` entry will produce."""
    folder = Path(model)
    if (folder / "model_index.json").exists() or (folder / "config.json").exists():
        return folder
    source = model
    if params is not None and folder.parent == Path("models"):
        if folder.name in params.models:
            source = params.models[folder.name].source
        if source.startswith(fetch.TINY):
            return _tiny_configs(source[len(fetch.TINY):])
    configs = realsize.configs_for(source)
    if configs is None:
        raise PipelineError(model, None, "no config files known for this model: run its model stage first "
                                         "(`dvc repro model@<name>`), or name a local pipeline folder")
    return configs


def _tiny_configs(source: str) -> Path:
    """A tiny model's folder, built once per machine (it is deterministic) for its config files."""
    folder = Path(tempfile.gettempdir()) / "dift-cache-plan" / source
    if not (folder / "model_index.json").exists() and not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{source}-", dir=folder.parent))
        tiny_models.make_tiny(source, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def latent_channels(encoder: EncoderParams, params: Params | None = None) -> int:
    if encoder.kind == "pixels":
        return 3
    return int(json.loads((model_configs(encoder.model, params) / "vae" / "config.json").read_text())["latent_channels"])


def latents_attrs_for(encoder: EncoderParams, params: Params | None = None) -> dict:
    return {"canvas": encoder.canvas, "encoder": "pixels" if encoder.kind == "pixels" else "vae",
            "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": latent_channels(encoder, params)}


# ---- rates --------------------------------------------------------------------------------------

def measured_rates(device: str, results: Path | None) -> dict[str, float]:
    """kind -> FLOP/s measured by benchmarks/realsize.py on this device type, if it ran (its figures in `results`)."""
    path = results / f"realsize-{device}.json" if results else None
    if path is None or not path.exists():
        return {}
    return {kind: row["flops_per_second"] for kind, row in json.loads(path.read_text())["backbones"].items()}


def match_seconds(protocol: str, statistics: str, device: str, results: Path | None) -> tuple[float, str]:
    """Seconds per pair of one matching variant, and where the figure comes from: measured by
    benchmarks/match.py (benchmarks/results/match.json: 1280 x 48 x 48, 10 keypoints a pair) on this device
    type (the CPU: with 2 threads), else on 2 CPU threads (for cuda: an upper bound), else the figure of
    the implementation before batching."""
    path = results / "match.json" if results else None
    measured = [r for r in json.loads(path.read_text()) if r["channels"] == 1280] if path and path.exists() else []
    kind = "cuda" if device.startswith("cuda") else "cpu"
    fallback = "benchmarks/match.py on 2 CPU threads" + (" (no CUDA figure yet: an upper bound)" if kind == "cuda" else "")
    for wanted, basis in ((kind, f"benchmarks/match.py on {kind}"), ("cpu", fallback)):
        rows = [r for r in measured if r["device"] == wanted and (wanted == "cuda" or r["threads"] == 2)]
        if rows:
            column = "geoaware" if protocol in ("geoaware", "sd-dino") else "exact_no_stats" if statistics == "none" else "exact"
            return rows[0][column], basis
    return MATCH_SECONDS_PER_PAIR, "the unbatched dift on 2 CPU cores: no benchmarks/results/match.json"


@functools.cache
def dift_rate() -> float:
    """FLOP/s that DIFT's published timing implies: SD2.1 to up_blocks.1 at 768 px, ensemble 8."""
    sd2 = realsize.CONFIGS / "sd2-1"
    params = BackboneParams(kind="sd2", model=str(sd2), latents="-", layers=["up_blocks.1"], timesteps=[261])
    run = meta_run(params, {"canvas": 768, "encoder": "vae", "scaling_factor": 1.0, "latent_channels": 4}, sd2)
    return run.flops * 8 / DIFT_SECONDS


# ---- the plan -----------------------------------------------------------------------------------

def make_plan(params: Params, images: int | None = None, results: Path | None = None) -> dict:
    """The plan of `params` for the prepared split, or for `images` images (pairs then estimated at
    SPair-71k test's ratio: a prepared table may belong to another profile). `results`: the folder of the
    project's measured rates (benchmarks/results), if any."""
    hub.quiet()  # models built from configs are cast with `.to(dtype)`, which diffusers warns about each time
    if images is None:
        if not Path(params.data.images).exists():
            raise PipelineError(params.data.images, None, "no prepared images table yet: run `dvc repro prepare`, "
                                                          "or estimate with --images N")
        images = pq.ParquetFile(params.data.images).metadata.num_rows
        if not Path(params.data.pairs).exists():
            raise PipelineError(params.data.pairs, None, "no prepared pairs table: run `dvc repro prepare`")
        pairs = pq.ParquetFile(params.data.pairs).metadata.num_rows
    else:
        pairs = round(images * SPAIR_TEST_PAIRS_PER_IMAGE)
    stores, gpu, seconds = [], [], []
    for name, encoder in params.latent_sources().items():
        attrs = latents_attrs_for(encoder, params)
        per_image = latents_bytes_per_image(encoder, attrs["latent_channels"])
        stores.append({"name": f"latents/{name}", "kind": "latents", "bytes_per_image": per_image, "images": images,
                       "bytes": per_image * images})
        if encoder.kind == "vae":
            memory, flops = vae_cost(encoder, params)
            gpu.append({"stage": f"encode@{name}", "device": encoder.device, "bytes": memory})
            seconds.append(_seconds(f"encode@{name}", encoder.device, "vae", flops * images, results))
    for name, backbone in params.backbones.items():
        encoder = params.encoder(backbone.latents)
        run = meta_run(backbone, latents_attrs_for(encoder, params), model_configs(backbone.model, params))
        per_image = stored_bytes(run, len(backbone.timesteps), backbone.storage)
        stores.append({"name": name, "kind": "features", "storage": backbone.storage, "bytes_per_image": per_image,
                       "images": images, "bytes": per_image * images,
                       "bytes_per_image_by_storage": {choice: stored_bytes(run, len(backbone.timesteps), choice)
                                                      for choice in STORAGE_CHOICES}})
        width = torch_dtype(backbone.dtype, "backbones").itemsize
        resident = (run.resident_parameters if backbone.offload == "blocks" else run.denoiser_parameters) * width
        denoiser = resident + ACTIVATION_FACTOR * backbone.ensemble * run.largest_activation
        gpu.append({"stage": f"extract@{name}", "device": backbone.device,
                    "bytes": max(run.text_parameters * width, denoiser),
                    "text_encoders": run.text_parameters * width, "denoiser": denoiser})
        # A lossy store also runs its fit sample (pca:K) and its fidelity sample (again as float16).
        kind = parse_storage(backbone.storage)[0]
        runs = images + (min(images, backbone.fit_images) if kind == "pca" else 0) + \
            (min(images, params.fidelity.images) if is_lossy(backbone.storage) else 0)
        seconds.append(_seconds(f"extract@{name}", backbone.device, backbone.kind,
                                run.flops * backbone.ensemble * len(backbone.timesteps) * runs, results))
    for name, backbone in params.backbones.items():
        variants = len(backbone.layers) * len(backbone.timesteps) * len(params.match.transforms_for(name))
        rates = [match_seconds(protocol, params.match.statistics, params.match.device, results) for protocol in params.match.protocols]
        per_pair = sum(rate for rate, _ in rates)
        seconds.append({"stage": f"match@{name}", "device": params.match.device, "seconds": pairs * variants * per_pair,
                        "basis": f"{pairs} pairs x {variants} variants x {per_pair * 1000:.2f} ms "
                                 f"({' + '.join(params.match.protocols)}; {rates[0][1]})"})
    total = sum(store["bytes"] for store in stores)
    return {"images": images, "pairs": pairs, "stores": stores, "total_bytes": total,
            "disk_free": disk_free(params.store), "downloads": downloads(params), "gpu_memory": gpu, "time": seconds}


def vae_cost(encoder: EncoderParams, params: Params) -> tuple[int, int]:
    parts = ConfigParts(model_configs(encoder.model, params), dtype=torch_dtype(encoder.dtype, "encoders"))
    vae = parts.load(parts.component_class("vae"), "vae")
    with FlopCounterMode(display=False) as flops, LargestOutput() as largest, torch.no_grad():
        vae.encode(torch.zeros(1, 3, encoder.canvas, encoder.canvas, device="meta", dtype=parts.dtype))
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    return weights + ACTIVATION_FACTOR * largest.bytes, int(flops.get_total_flops())


def _seconds(stage: str, device: str, kind: str, flops: float, results: Path | None) -> dict:
    if not flops:
        return {"stage": stage, "device": device, "seconds": 0.0, "basis": "no model runs (reads the latents)"}
    device_type = "cuda" if device.startswith("cuda") or device == "auto" else "cpu"
    measured = measured_rates(device_type, results).get(kind)
    if measured:
        return {"stage": stage, "device": device_type, "seconds": flops / measured,
                "basis": f"FLOPs at the rate benchmarks/realsize.py measured for {kind} on {device_type}"}
    if device_type == "cpu":
        return {"stage": stage, "device": "cpu", "seconds": None,
                "basis": "unknown: run benchmarks/realsize.py on this machine"}
    return {"stage": stage, "device": "cuda", "seconds": flops / dift_rate(),
            "basis": "FLOPs at the rate of DIFT's 203 ms per image on an A6000"}


def downloads(params: Params) -> list[dict]:
    """Bytes each `model@` stage fetches: the parameters of the components the stages load, in the
    precision of the repository's weight files."""
    rows = []
    for name, model in params.models.items():
        real = realsize.REAL_MODELS.get(realsize.MOVED.get(model.source, model.source))
        if real is None:  # built here (realsize) or unknown
            rows.append({"model": name, "source": model.source, "bytes": 0})
            continue
        parts = ConfigParts(realsize.CONFIGS / real.folder)
        needed = fetch.components(params, name)
        count = sum(parameters(parts, component) for component in needed) if needed else parameters(parts, None)
        rows.append({"model": name, "source": model.source, "revision": model.revision, "gated": real.gated,
                     "components": needed, "bytes": count * torch_dtype(real.weights_dtype, "models").itemsize})
    return rows


def format_plan(plan: dict) -> str:
    h = human
    lines = [f"{plan['images']} images, {plan['pairs']} pairs", ""]
    lines.append(tabulate([[s["name"], s.get("storage", ""), h(s["bytes_per_image"]), s["images"], h(s["bytes"])]
                           for s in plan["stores"]],
                          headers=["store", "storage", "per image", "images", "bytes"]))
    fits = "fits" if plan["total_bytes"] <= plan["disk_free"] else "DOES NOT FIT"
    lines += ["", f"stores in all: {h(plan['total_bytes'])}; free on the store's disk: {h(plan['disk_free'])} ({fits})", ""]
    lines.append(tabulate([[d["model"], d["source"], h(d["bytes"]), "yes" if d.get("gated") else ""]
                           for d in plan["downloads"]], headers=["model", "source", "download", "gated"]))
    lines.append("")
    lines.append(tabulate([[g["stage"], g["device"], h(g["bytes"])] for g in plan["gpu_memory"]],
                          headers=["stage", "device", "peak memory (est.)"]))
    lines.append("")
    lines.append(tabulate([[t["stage"], t["device"], "?" if t["seconds"] is None else f"{t['seconds'] / 3600:.2f}",
                            t["basis"]] for t in plan["time"]], headers=["stage", "device", "hours", "basis"]))
    return "\n".join(lines)
