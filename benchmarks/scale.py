"""Memory and time against dataset size: encode, extract and match at 100 and 1,000 demo images.

Each stage runs as `python cli.py ...` in its own process; its peak RSS is the kernel's high-water
mark (VmHWM) for that process. Expect peak RSS flat (extract and match hold a few images' features,
whatever the dataset size) and time linear in images (encode, extract) and pairs (match): a line
through the smallest and largest sizes should predict the middle one. At the largest size, extract
and match also run on a local dask cluster: the speedup, and a check that results are identical.

    python benchmarks/scale.py [--sizes 100 300 1000] [--canvas 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.demo.dataset import DemoSpec, generate  # noqa: E402
from pipeline.data.spair import load_split, write_split  # noqa: E402
from pipeline.demo.tiny_models import make_tiny  # noqa: E402

IMAGES_PER_SOURCE = 5  # the demo makes, per source object, the source and 4 views of it
CATEGORIES = 3


def stage(*args: str, cwd: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of `python cli.py args...`.

    Not rusage's ru_maxrss: a child forked from this (large) process starts with our pages resident.
    The kernel's VmHWM for the child after exec is its own peak; it only grows, so the last reading
    before exit is the peak."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    status, peak = Path(f"/proc/{process.pid}/status"), 0
    while process.poll() is None:
        try:
            peak = max(peak, _high_water_mark(status.read_text()))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.wait() != 0:
        raise SystemExit(f"cli.py {' '.join(args)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return seconds, peak


def _high_water_mark(status: str) -> int:
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def prepare(base: Path, images: int, model: Path, canvas: int) -> Path:
    """A demo of about `images` images, its split, and params.yaml for one VAE and one backbone."""
    sources = max(1, round(images / (IMAGES_PER_SOURCE * CATEGORIES)))
    root = generate(base / "demo", DemoSpec(sources_per_category=sources))
    write_split(load_split(root, "test"), base / "pairs.parquet", base / "images.parquet")
    params = {
        "data": {"root": str(root), "pairs": str(base / "pairs.parquet"), "images": str(base / "images.parquet")},
        "encoders": {"sd3": {"model": str(model), "canvas": canvas}},
        "backbones": {"sd3": {"kind": "sd3", "model": str(model), "latents": "sd3",
                              "layers": ["transformer_blocks.1", "transformer_blocks.3"], "timesteps": [261],
                              "ensemble": 1}},
        "store": str(base / "store"),
    }
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    return base


def measure(base: Path, workers: int | None = None) -> dict:
    suffix = f"-w{workers}" if workers else ""
    dask = ["--workers", str(workers)] if workers else []
    row = {}
    if not workers:
        row["encode"] = stage("encode", "--encoder", "sd3", cwd=base)
    row["extract"] = stage("extract", "--backbone", "sd3", "--store", f"store/sd3{suffix}.zarr", *dask, cwd=base)
    row["match"] = stage("match", "--store", f"store/sd3{suffix}.zarr", "--out", f"predictions{suffix}.parquet",
                         *dask, cwd=base)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny("tiny-sd3", tmp / "tiny-sd3")
        rows = []
        for size in args.sizes:
            base = prepare(tmp / str(size), size, model, args.canvas)
            images, pairs = len(pd.read_parquet(base / "images.parquet")), len(pd.read_parquet(base / "pairs.parquet"))
            for name, (seconds, rss) in measure(base).items():
                count = pairs if name == "match" else images
                rows.append({"images": images, "pairs": pairs, "stage": name, "seconds": seconds,
                             "ms_per_item": 1000 * seconds / count, "peak_rss_mib": rss / 2**20})
            print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"), flush=True)

        table = pd.DataFrame(rows)
        large = table[table["images"] == table["images"].max()]
        print("\nlargest vs smallest size; time = fixed + per item x items, fitted through them:")
        for name, runs in table.groupby("stage", sort=False):
            runs = runs.sort_values("images")
            items = runs["pairs" if name == "match" else "images"].to_numpy(float)
            seconds = runs["seconds"].to_numpy()
            per_item = (seconds[-1] - seconds[0]) / (items[-1] - items[0])
            fixed = seconds[0] - per_item * items[0]
            middle = ", ".join(f"{n:.0f} items: predicted {fixed + per_item * n:.1f} s, measured {t:.1f} s"
                               for n, t in zip(items[1:-1], seconds[1:-1]))
            rss = runs["peak_rss_mib"].to_numpy()
            print(f"  {name:8s} items x{items[-1] / items[0]:.1f}   time x{seconds[-1] / seconds[0]:.2f}   "
                  f"peak RSS x{rss[-1] / rss[0]:.2f} ({rss[0]:.0f} -> {rss[-1]:.0f} MiB)   "
                  f"fixed {fixed:.1f} s + {1000 * per_item:.1f} ms/item   [{middle}]")

        base = tmp / str(max(args.sizes))
        distributed = measure(base, args.workers)
        print(f"\n{args.workers} local dask workers vs one process, {int(large['images'].iloc[0])} images:")
        for name, (seconds, _) in distributed.items():
            single = large[large["stage"] == name]["seconds"].iloc[0]
            print(f"  {name:8s} {single:.1f} s -> {seconds:.1f} s   speedup x{single / seconds:.2f}")
        same = pd.read_parquet(base / "predictions.parquet").equals(
            pd.read_parquet(base / f"predictions-w{args.workers}.parquet"))
        print(f"  predictions identical to the single-process run: {same}")


if __name__ == "__main__":
    main()
