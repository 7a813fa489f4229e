"""Extraction cost on mid-size random models (CPU unless --device cuda).

Prints, from one run, medians over --repeats:
  (a) SD2: a sweep of 4 layers x 2 timesteps vs single-layer single-timestep runs
      (one forward per timestep captures every layer: expect ~2 single runs, not 8);
  (b) SD3: extracting an early block vs the last block (the forward stops after the deepest layer);
  (c) the store-writing overhead: extract() vs the bare forward loop over the same inputs;
  (d) the cost of a lossy `storage` (--storage, each): SD3 extracting every block, against float16, and its
      part in writing; a real-size SD3-medium image's write.

    python benchmarks/extract.py [--images 8] [--canvas 256] [--repeats 3] [--device cpu]
        [--storage pca:256 --storage pca:64 ...] [--storage-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache import codecs
from pipeline.cache.store import FeatureStore
from pipeline.models import hub
from pipeline.models.backbones.parts import Parts
from pipeline.models.backbones.registry import make_backbone
from pipeline.config import BackboneParams, parse_storage
from pipeline.demo.dataset import generate
from pipeline.config import EncoderParams
from pipeline.cache.encode import encode
from pipeline.cache.extract import extract
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny_sd2, make_tiny_sd3

MID_SD2_UNET = {"block_out_channels": (128, 256, 512, 512), "attention_head_dim": (4, 8, 16, 16),
                "layers_per_block": 2, "norm_num_groups": 32}
MID_SD3_TRANSFORMER = {"num_layers": 12, "num_attention_heads": 8, "attention_head_dim": 32,
                       "caption_projection_dim": 256}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_image(fn, repeats: int) -> float:
    """Median over repeats of the store's median seconds per image (model loading excluded); each store is
    deleted once read, so that a run's disk use stays that of one store."""
    def once() -> float:
        path = fn()
        seconds = float(np.median(FeatureStore.open(path).images()["seconds"]))
        shutil.rmtree(path)
        return seconds

    return statistics.median(once() for _ in range(repeats))


def real_size_writes(storage: str, images: int, blocks: int = 24, cells: int = 48, channels: int = 1536) -> float:
    """Median seconds to write one image of SD3-medium's `blocks` blocks at 768 px (48 x 48 x 1536 float16:
    normal values with two massive channels) through the extraction's own write (FeatureStore.write_image)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1, cells, cells, channels)).astype(np.float16)
    values[..., [3, channels // 2 + 3]] = [300.0, -150.0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "writes.zarr"
        root = zarr.open_group(path, mode="w")
        root.create_array("image", shape=(images,), dtype="int64")
        written = FeatureStore(path, root)
        coords = {"y": np.arange(cells), "x": np.arange(cells), "channel": np.arange(channels)}
        basis = None
        if parse_storage(storage)[0] == "pca":  # axes fitted on the same values (timing only)
            moments = codecs.LayerMoments()
            moments.add(values[0])
            basis = moments.fit(parse_storage(storage)[1])
        nodes = [written.ensure_layer(f"transformer_blocks.{b}", {"features": (("timestep", "y", "x", "channel"),
                                      values.shape)}, coords, {}, storage={"features": storage}, basis=basis)
                 for b in range(blocks)]
        times = []
        with codecs.one_blas_thread:  # as the extraction loop holds it
            for index in range(images):
                start = time.perf_counter()
                FeatureStore.write_image(index, [(node["features"], values) for node in nodes])
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_size_moments(blocks: int = 24, cells: int = 48, channels: int = 1536) -> float:
    """Seconds for a `pca:K` fit to take in one real-size SD3-medium image (every block's second moments)."""
    values = np.random.default_rng(0).standard_normal((cells, cells, channels)).astype(np.float16)
    moments = codecs.LayerMoments()
    start = time.perf_counter()
    for _ in range(blocks):
        moments.add(values)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--storage", action="append", default=None, help="(d): default pca:128")
    parser.add_argument("--storage-only", action="store_true", help="run (d) alone")
    args = parser.parse_args()
    hub.quiet()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as work:
        benchmark(args, Path(work))


def benchmark(args: argparse.Namespace, work: Path) -> None:
    root = generate(work / "demo")
    images = load_split(root, "test").images.iloc[: args.images].reset_index(drop=True)
    sd2 = make_tiny_sd2(work / "sd2", unet_overrides=MID_SD2_UNET)
    sd3 = make_tiny_sd3(work / "sd3", transformer_overrides=MID_SD3_TRANSFORMER)
    latents = {name: encode(EncoderParams(model=str(model), canvas=args.canvas, device=args.device), images, root,
                            work / f"latents-{name}.zarr") for name, model in (("sd2", sd2), ("sd3", sd3))}
    base = {"ensemble": 1, "device": args.device, "dtype": args.dtype}
    sd2_params = BackboneParams(kind="sd2", model=str(sd2), latents="sd2", **base)
    sd3_params = BackboneParams(kind="sd3", model=str(sd3), latents="sd3", **base)
    runs = iter(range(10**6))

    def run(params):
        kind = params.kind
        return lambda: extract(params, kind, latents[kind], work / f"run{next(runs)}.zarr")

    print(f"{args.images} images, canvas {args.canvas}, device {args.device}, dtype {args.dtype}, "
          f"median of {args.repeats}; torch threads {torch.get_num_threads()}")
    print("seconds per image (median), model loading excluded:")
    up = [f"up_blocks.{i}" for i in range(4)]
    blocks = MID_SD3_TRANSFORMER["num_layers"]
    every = replace(sd3_params, layers=[f"transformer_blocks.{i}" for i in range(blocks)])
    lossy = args.storage or ["pca:128"]
    # Rounds: each extracts with every storage, in an order that turns round from one round to the next, so
    # that a slow spell of the machine, or what the run before leaves behind, hits every storage; each round's
    # change is against its own float16 run. The extraction's writes (FeatureStore.write_image) are timed apart:
    # what a storage itself costs, without the forward passes' noise.
    write_image, write_seconds = FeatureStore.write_image, []

    def timed_write(*job):
        start = time.perf_counter()
        write_image(*job)
        write_seconds.append(time.perf_counter() - start)

    FeatureStore.write_image = staticmethod(timed_write)
    rounds, writes = [], []
    for round_ in range(args.repeats):
        order = ["float16", *lossy][:: 1 if round_ % 2 == 0 else -1]
        seconds, writing = {}, {}
        for storage in order:
            write_seconds.clear()
            seconds[storage] = per_image(run(replace(every, storage=storage)), 1)
            writing[storage] = statistics.median(write_seconds)
        rounds.append(seconds)
        writes.append(writing)
    FeatureStore.write_image = staticmethod(write_image)
    line = f"(d) SD3 all {blocks} blocks, float16 {statistics.median(r['float16'] for r in rounds):.3f} s/img"
    written = f"    of which writing: float16 {statistics.median(w['float16'] for w in writes):.3f} s/img"
    for storage in lossy:
        changes = sorted(100 * (r[storage] / r["float16"] - 1) for r in rounds)
        line += (f"; {storage} {statistics.median(r[storage] for r in rounds):.3f} s/img ({statistics.median(changes):+.1f}%;"
                 f" rounds {' '.join(f'{c:+.0f}' for c in changes)})")
        extra = statistics.median(w[storage] - w["float16"] for w in writes)
        written += (f"; {storage} {statistics.median(w[storage] for w in writes):.3f} s/img: {1000 * extra:+.0f} ms, "
                    f"{100 * statistics.median((w[storage] - w['float16']) / r['float16'] for w, r in zip(writes, rounds)):+.1f}% "
                    f"of a float16 image")
    print(line + f"  (median of per-round changes; target <= +10%; {os.cpu_count()} CPUs)", flush=True)
    print(written, flush=True)
    # pca:K first runs its fit sample (fit_images forward passes, not stored) and takes in their moments.
    import pipeline.cache.extract as extraction

    fit_seconds, fit = [], extraction._fit_axes

    def timed_fit(*job):
        start = time.perf_counter()
        fit(*job)
        fit_seconds.append(time.perf_counter() - start)

    extraction._fit_axes = timed_fit
    per_image(run(replace(every, storage="pca:128", fit_images=args.images)), 1)
    extraction._fit_axes = fit
    print(f"    pca:128's fit on {args.images} images: {fit_seconds[0] / args.images:.3f} s/img (forward pass and "
          f"moments; a store runs it on fit_images of its images); moments of one real-size SD3-medium image "
          f"(24 blocks): {real_size_moments():.2f} s", flush=True)
    writes = [{storage: real_size_writes(storage, args.images) for storage in ["float16", *lossy][:: 1 if r % 2 == 0 else -1]}
              for r in range(args.repeats)]
    line = (f"    writing one real-size SD3-medium image (24 blocks x 48 x 48 x 1536): float16 "
            f"{statistics.median(w['float16'] for w in writes):.3f} s")
    for storage in lossy:
        change = statistics.median(w[storage] / w["float16"] - 1 for w in writes)
        line += f"; {storage} {statistics.median(w[storage] for w in writes):.3f} s ({100 * change:+.1f}%)"
    print(line, flush=True)
    if args.storage_only:
        return
    sweep = per_image(run(replace(sd2_params, layers=up, timesteps=[101, 261])), args.repeats)
    single = {layer: per_image(run(replace(sd2_params, layers=[layer], timesteps=[261])), args.repeats)
              for layer in up}
    separate = 2 * sum(single.values())  # one run per (layer, timestep)
    print(f"(a) SD2 sweep 4 layers x 2 timesteps: {sweep:.3f} s/img; single-layer runs: "
          + ", ".join(f"{k} {v:.3f}" for k, v in single.items()))
    print(f"    sweep / one single-layer run (up_blocks.3) = {sweep / single['up_blocks.3']:.2f}  (target ~2); "
          f"sweep / 8 separate runs = {sweep / separate:.2f}")

    early = per_image(run(replace(sd3_params, layers=["transformer_blocks.1"])), args.repeats)
    last = per_image(run(replace(sd3_params, layers=[f"transformer_blocks.{blocks - 1}"])), args.repeats)
    print(f"(b) SD3 ({blocks} blocks) transformer_blocks.1: {early:.3f} s/img, transformer_blocks.{blocks - 1}: "
          f"{last:.3f} s/img, ratio {early / last:.2f}")

    params = replace(sd2_params, layers=up, timesteps=[101, 261])
    device = hub.resolve_device(args.device)
    group = FeatureStore.open_latents(latents["sd2"])
    parts = Parts(params.model, device, hub.resolve_dtype(args.dtype, device))
    backbone = make_backbone(params, dict(group.attrs), parts, sorted(images["category"].unique()))
    mean = group["posterior/mean"]

    def bare():
        for index in range(len(images)):
            x = backbone.model_latent(torch.from_numpy(mean[index]).permute(2, 0, 1)[None])
            for t in params.timesteps:
                out = backbone.run(x.to(device, backbone.dtype), t, images["category"].iloc[index])
                for arrays in out.values():
                    arrays["features"].float().mean(0).cpu().numpy()

    bare_loop = timed(bare, args.repeats) / len(images)
    with_store = per_image(run(params), args.repeats)
    print(f"(c) SD2 sweep: bare forward loop {bare_loop:.3f} s/img, extract() incl. noise draws, averaging and "
          f"store writes {with_store:.3f} s/img: overhead {100 * (with_store - bare_loop) / bare_loop:.0f}%")


if __name__ == "__main__":
    main()
