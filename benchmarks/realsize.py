"""Real-size architectures with random weights: seconds per image, peak memory and bytes per image, per backbone.

Runs the backbones of profiles/realsize-smoke.yaml (SD2.1, SD3-medium without T5, DINOv2-B/14, CLIP ViT-H/14,
both VAEs, at the real study's canvases and layers) on --images demo images. Each encode and extract is its own
`python cli.py` process, so its peak RSS is the kernel's high-water mark for it. Per backbone it prints seconds
per image (median over the store's images but the first: warm-up), peak RSS, peak GPU memory (with --device
cuda: float16 on the GPU; the canvases stay on the CPU), stored bytes per image (on disk, and as `plan` computes
them uncompressed) and the FLOP rate achieved; the rates
go to benchmarks/results/realsize-<device>.json, which `python cli.py plan` uses for its time estimates.

    python benchmarks/realsize.py [--device cpu|cuda] [--images 2] [--models .cache/realsize]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale import stage  # noqa: E402

from pipeline.workflows import plan  # noqa: E402
from pipeline.cache import sizes, store  # noqa: E402
from pipeline.cache.store import FeatureStore  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.demo.dataset import DemoSpec, generate  # noqa: E402
from pipeline.workflows.fetch import materialise  # noqa: E402
from pipeline.data.spair import load_split, write_split  # noqa: E402

PROFILE = REPO / "profiles" / "realsize-smoke.yaml"


def project(base: Path, models: Path, images: int, device: str) -> Path:
    """params.yaml for the profile on `images` demo images, models from `models`, on `device`."""
    params = yaml.safe_load(PROFILE.read_text())
    root = generate(base / "demo", DemoSpec(sources_per_category=1))
    split = load_split(root, "test", categories=params["data"]["categories"])
    kept = split.images.iloc[:images]
    pairs = split.pairs[split.pairs["src_image"].isin(kept["image"]) & split.pairs["trg_image"].isin(kept["image"])]
    write_split(dataclasses.replace(split, images=kept, pairs=pairs), base / "pairs.parquet", base / "images.parquet")
    params["data"] |= {"root": str(root), "pairs": str(base / "pairs.parquet"), "images": str(base / "images.parquet")}
    params["store"] = str(base / "store")
    for section in ("encoders", "backbones"):
        for entry in params[section].values():
            if "model" in entry:
                entry["model"] = str(models / Path(entry["model"]).name)
            if device == "cuda" and entry.get("kind") != "pixels":
                entry |= {"device": "cuda", "dtype": "float16"}
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return base / "params.yaml"


def seconds_per_image(table: pd.DataFrame) -> float:
    """The median over the store's images but the first, which also pays for warm-up (CUDA kernel selection,
    the allocator's first blocks): with two images, the median of two would be half warm-up."""
    seconds = table["seconds"]
    return float((seconds.iloc[1:] if len(seconds) > 1 else seconds).median())


def _row(stage: str, path: Path, table: pd.DataFrame, seconds: float, rss: int, planned: int, device: str) -> dict:
    per_image = seconds_per_image(table)
    return {"stage": stage, "s/image": per_image, "images/s": 1 / per_image, "process s": seconds,
            "peak RSS GiB": rss / 2**30,
            "peak GPU GiB": table["peak_memory"].max() / 2**30 if device == "cuda" else float("nan"),
            "MB/image on disk": store.size_on_disk(path) / len(table) / 1e6, "MB/image planned": planned / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--models", type=Path, default=REPO / ".cache" / "realsize",
                        help="Where the real-size model folders are built (kept between runs; ~11 GB).")
    args = parser.parse_args()

    profile = load_params(PROFILE)
    for name, model in profile.models.items():
        folder = args.models / name
        if not ((folder / "model_index.json").exists() or (folder / "config.json").exists()):
            print(f"building {folder} ({model.source})", flush=True)
            materialise(model.source, folder, model.seed)

    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        params_file = project(Path(tmp), args.models, args.images, args.device)
        params = load_params(params_file)
        for name, encoder in params.latent_sources().items():
            seconds, rss = stage("encode", "--params", str(params_file), "--encoder", name, cwd=REPO)
            path = params.latents_path(name)
            table = FeatureStore.open(path).images()
            per_image = seconds_per_image(table)
            if encoder.kind == "vae":
                _, flops = plan.vae_cost(encoder, params)
                rates["vae"] = {"flops_per_second": flops / per_image}
            planned = sizes.latents_bytes_per_image(encoder, plan.latent_channels(encoder, params))
            rows.append(_row(f"encode@{name}", path, table, seconds, rss, planned, encoder.device))  # canvases: the CPU
            print(rows[-1], flush=True)
        for name, backbone in params.backbones.items():
            seconds, rss = stage("extract", "--params", str(params_file), "--backbone", name, cwd=REPO)
            path = params.store_path(name)
            table = FeatureStore.open(path).images()
            per_image = seconds_per_image(table)
            run = sizes.meta_run(backbone, plan.latents_attrs_for(params.encoder(backbone.latents), params),
                                 plan.model_configs(backbone.model, params))
            flops = run.flops * backbone.ensemble * len(backbone.timesteps)
            if flops:
                rates[backbone.kind] = {"flops_per_second": flops / per_image}
            planned = sizes.stored_bytes(run, len(backbone.timesteps))
            rows.append(_row(f"extract@{name}", path, table, seconds, rss, planned, backbone.device))
            print(rows[-1], flush=True)

    frame = pd.DataFrame(rows)
    print(f"\n{args.images} images, device {args.device} ({platform.processor() or platform.machine()}):")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    out = REPO / "benchmarks" / "results" / f"realsize-{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "images": args.images, "backbones": rates,
                               "table": frame.to_dict("records")}, indent=1, default=float) + "\n")
    print(f"rates -> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
