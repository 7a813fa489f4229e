"""Explorer latency, as the page sees it: HTTP round trips to a running server (pipeline/explorer/server.py).

Two settings, 8 maps a click each:
- demo: the stores of `dvc repro` (store/*.zarr, params.yaml), each store's default variant plus more
  layers of sd3 up to 8 maps;
- real size: a store written here with SD3-medium's block shape, 1536 x 48 x 48 float16 per image (8
  layers, smooth random features), and 500 x 375 images, as SPair's.
For each: choosing a pair (the page's `warm`: maps read, targets prepared, the pair's keypoints matched),
then clicks on annotated keypoints and on free points, each free click followed by the page's dataset-wide
search (20 cells, the first map's layer; the index built before timing, as `index_build_ms`); medians over
the clicks. The last line:
`demo: <a> ms, real size: <b> ms a click of 8 maps (median, free points)`.

    python benchmarks/explore.py [--clicks 15] [--json benchmarks/results/explore.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache.store import FeatureStore  # noqa: E402
from pipeline.matching.maps import Variant  # noqa: E402
from pipeline.explorer.explorer import Explorer, load_best  # noqa: E402
from pipeline.explorer.server import Background  # noqa: E402

MAPS = 8


def post(server: Background, path: str, body: dict) -> float:
    """Seconds for one POST, response read (with the server's token, as the page sends its cookie)."""
    request = urllib.request.Request(server.base + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"token {server.token}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


def measure(explorer: Explorer, variants: list[Variant], pairs: list[str], clicks: int) -> dict:
    server = Background(explorer)
    rng = np.random.default_rng(0)
    body = {"variants": [vars(v) for v in variants]}
    try:
        choose, keypoints, free, searches = [], [], [], []
        first = explorer.pairs.loc[pairs[0]]
        build = post(server, "api/search", {"variant": vars(variants[0]), "image": first["src_image"], "x": 0, "y": 0})
        for pair in pairs:
            row = explorer.pairs.loc[pair]
            choose.append(post(server, "api/warm", {**body, "pair": pair}))
            for _ in range(clicks):
                keypoints.append(post(server, "api/click", {**body, "pair": pair,
                                                                 "keypoint": int(rng.integers(len(row["kps_ids"])))}))
                x, y = int(rng.integers(row["src_width"])), int(rng.integers(row["src_height"]))
                free.append(post(server, "api/click", {**body, "pair": pair, "x": x, "y": y}))
                searches.append(post(server, "api/search", {"variant": vars(variants[0]), "image": row["src_image"],
                                                            "x": x, "y": y, "top": 20}))
    finally:
        server.stop()
    ms = lambda values: round(1000 * statistics.median(values), 1)  # noqa: E731
    return {"maps": len(variants), "choose_pair_ms": ms(choose), "keypoint_click_ms": ms(keypoints),
            "free_click_ms": ms(free), "search_ms": ms(searches), "index_build_ms": round(1000 * build, 1),
            "clicks": len(free)}


def demo(clicks: int) -> dict:
    from pipeline.config import load_params
    from pipeline.evaluation.metrics import BEST_DIR

    params = load_params(REPO / "params.yaml")
    paths = [REPO / params.store / f"{name}.zarr" for name in params.backbones]
    if not all(path.exists() for path in paths):
        raise SystemExit("the demo's stores are missing: run `dvc repro` first")
    explorer = Explorer(paths, pd.read_parquet(REPO / params.data.pairs), pd.read_parquet(REPO / params.data.images),
                        REPO / params.data.root, transforms={n: params.match.transforms_for(n) for n in params.backbones},
                        best=load_best(REPO / BEST_DIR))
    variants = [Variant(**s["default"]) for s in explorer.catalogue()["stores"]]
    sd3 = explorer.maps["sd3"]
    variants += [Variant("sd3", layer, sd3.timesteps[0]) for layer in sd3.layers][: MAPS - len(variants)]
    cross = explorer.pairs[explorer.pairs["src_image"] != explorer.pairs["trg_image"]]
    return measure(explorer, variants[:MAPS], list(cross["filename"][:4]), clicks)


def real_size(folder: Path, clicks: int, images: int = 6) -> dict:
    """A store of SD3-medium's block shape (1536 x 48 x 48 at a 768 canvas, stride 16) over 500 x 375 images."""
    rng = np.random.default_rng(0)
    width, height, channels, cells, canvas = 500, 375, 1536, 48, 768
    keys = [f"bench/image_{i:02d}" for i in range(images)]
    (folder / "JPEGImages" / "bench").mkdir(parents=True)
    for key in keys:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / "JPEGImages" / f"{key}.jpg")
    table = pd.DataFrame({"image": keys, "category": "bench", "width": width, "height": height, "valid_x0": 0.0,
                          "valid_y0": 0.0, "valid_x1": float(canvas), "valid_y1": float(canvas)})
    layers = [f"transformer_blocks.{i}" for i in range(MAPS)]
    path = folder / "sd3-real-size.zarr"
    written = FeatureStore.create(path, {"kind": "features", "name": "sd3", "determinants": {"benchmark": 1}}, table, [261])
    for index in range(images):
        for layer in layers:
            # Smooth features (a coarse random field upsampled), so maps have structure as real ones do.
            coarse = torch.from_numpy(rng.standard_normal((1, channels, 6, 6)).astype(np.float32))
            smooth = F.interpolate(coarse, size=(cells, cells), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            noisy = smooth.numpy() + 0.3 * rng.standard_normal((cells, cells, channels)).astype(np.float32)
            node = written.ensure_layer(layer, {"features": (("timestep", "y", "x", "channel"), (1, cells, cells, channels))},
                                       {"channel": np.arange(channels)}, {"stride": canvas / cells})
            node["features"][index] = noisy[None].astype(np.float16)
        written.mark_done(index, 0.0, 0)
    written.finish()
    pairs = []
    for i in range(images - 1):
        kps = rng.integers([0, 0], [width, height], size=(10, 2))
        pairs.append({"split": "test", "filename": f"{i:06d}-bench:bench", "category": "bench", "src_image": keys[i],
                      "trg_image": keys[i + 1], "src_kps": list(kps), "trg_kps": list(kps), "kps_ids": [str(k) for k in range(10)],
                      "trg_bndbox": [50, 40, 450, 330], "src_width": width, "src_height": height, "trg_width": width,
                      "trg_height": height})
    images_table = pd.DataFrame({"image": keys, "path": [f"JPEGImages/{k}.jpg" for k in keys], "width": width, "height": height})
    explorer = Explorer([path], pd.DataFrame(pairs), images_table, folder)
    return measure(explorer, [Variant("sd3", layer, 261) for layer in layers], [p["filename"] for p in pairs[:3]], clicks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=15, help="clicks of each kind per pair")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cache = tempfile.TemporaryDirectory()
    os.environ["DIFT_CACHE_DIR"] = cache.name  # search indexes built here, not found from an earlier run
    results = {"threads": torch.get_num_threads(), "demo": demo(args.clicks)}
    print(f"demo: {results['demo']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        results["real_size"] = real_size(Path(folder), args.clicks)
    print(f"real size: {results['real_size']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"demo: {results['demo']['free_click_ms']} ms, real size: {results['real_size']['free_click_ms']} ms "
          f"a click of {MAPS} maps (median, free points)")


if __name__ == "__main__":
    main()
