"""Matching cost at the real study's sizes: 1280 x 48 x 48 (SD2 up_blocks.1) and 1536 x 48 x 48 (SD3 blocks)
features, 500 x 375 images, 10 keypoints a pair.

Prints, from one run, pairs/s of
- naive: DIFT's evaluation code, step for step (both maps upsampled to the images; per keypoint, the
  normalised target map times the normalised source vector, and its argmax), float32;
- vectorised naive: the same maths without DIFT's redundancy (the target normalised once, one product);
- previous: this project's implementation before batching (kept below as `previous_dift`): per pair, the
  target's full upsampled cosine map at image resolution, then its argmax and statistics;
- exact: the `dift` protocol as `match` runs it (pipeline.matching.protocols: every keypoint of every pair
  that shares a target in one product, branch and bound for the argmax), with basic statistics and without;
- geoaware: the patch-grid protocol, for scale;
on the CPU with 1 and 2 threads (each in its own process) and on CUDA when present, with the fraction of
argmaxes identical to naive (and exact to previous). As in `match`, each target serves several pairs
(SPair-71k's test split: 12,234 pairs over ~1,800 target images, ~7 each), so what is prepared once per
target is prepared once per target here too. Times are per pair, medians over targets.
The last line: `exact: <P> pairs/s, naive: <Q> pairs/s, speedup: <S>x, identical argmax: <a>/<b>`, for 1280
channels, 2 CPU threads, basic statistics.

    python benchmarks/match.py [--targets 5] [--pairs-per-target 7] [--naive-pairs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.matching.protocols import (FeatureMap, argmax_points, geoaware_cells, match_queries,  # noqa: E402
                                         similarity_stats, DiftTarget, GeoawareTarget)

WIDTH, HEIGHT, GRID, KEYPOINTS = 500, 375, 48, 10


def smooth_features(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Spatially correlated features (as a network's are), (48, 48, C) float32."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, 12, 12)).astype(np.float32))
    up = F.interpolate(coarse, size=(GRID, GRID), mode="bilinear", align_corners=False)[0]
    return (up.permute(1, 2, 0).numpy() + 0.3 * rng.standard_normal((GRID, GRID, channels))).astype(np.float32)


def feature_map(features: np.ndarray) -> FeatureMap:
    return FeatureMap(features, WIDTH, HEIGHT, valid_x1=768.0, valid_y1=768.0, stride=16.0)


def naive_dift(source: np.ndarray, target: np.ndarray, points: np.ndarray, device: str) -> np.ndarray:
    """DIFT's evaluation as its code does it (Tsingularity/dift eval_spair.py): both (1, C, h, w) maps through
    nn.Upsample to the image size, then per keypoint the normalised source vector against the normalised
    target map, and the argmax. float32."""
    def up(f):
        x = torch.from_numpy(f).permute(2, 0, 1)[None].contiguous().to(device)  # (1, C, h, w), as the U-Net gives it
        return torch.nn.Upsample(size=(HEIGHT, WIDTH), mode="bilinear")(x)
    src_ft, trg_ft = up(source), up(target)
    channels = src_ft.shape[1]
    found = []
    for x, y in points:
        src_vec = F.normalize(src_ft[0, :, y, x].view(1, channels)).transpose(0, 1)
        trg_vec = F.normalize(trg_ft.view(channels, -1).transpose(0, 1))
        cos_map = torch.mm(trg_vec, src_vec).view(HEIGHT, WIDTH).cpu().numpy()
        best_y, best_x = np.unravel_index(cos_map.argmax(), cos_map.shape)
        found.append((best_x, best_y))
    return np.array(found)


def vectorised_naive(source: np.ndarray, target: np.ndarray, points: np.ndarray, device: str) -> np.ndarray:
    """The same maths with DIFT's redundancy removed: the target normalised once, one product for all keypoints."""
    def up(f):
        return F.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None].contiguous().to(device), size=(HEIGHT, WIDTH),
                             mode="bilinear", align_corners=False)[0]
    src, trg = up(source), up(target)
    vectors = F.normalize(src[:, points[:, 1], points[:, 0]].T, dim=1)
    flat = (vectors @ F.normalize(trg.reshape(trg.shape[0], -1), dim=0)).argmax(dim=1).cpu().numpy()
    return np.stack([flat % WIDTH, flat // WIDTH], axis=1)


def previous_dift(source: FeatureMap, target: FeatureMap, points: np.ndarray):
    """The implementation this replaced: a full (K, H, W) cosine map per pair, its argmax and statistics."""
    scores = target.cosine(source.vectors_at(points))
    best = argmax_points(scores)
    return best, similarity_stats(scores, best)


def make_groups(channels: int, targets: int, pairs_per_target: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(targets):
        target = smooth_features(rng, channels)
        sources = []
        for _ in range(pairs_per_target):
            # A source: the target shifted by a few cells plus noise, so each keypoint has a true peak.
            source = np.roll(target, shift=tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
            source = source + 0.5 * rng.standard_normal(source.shape).astype(np.float32)
            points = np.stack([rng.integers(0, WIDTH, KEYPOINTS), rng.integers(0, HEIGHT, KEYPOINTS)], axis=1)
            sources.append((source, points))
        groups.append((target, sources))
    return groups


def exact_group(target: np.ndarray, sources, protocol: str, statistics: str, device: str) -> list[np.ndarray]:
    """One target's pairs as `match` runs them: the target prepared once, all their queries in one call."""
    target_map = feature_map(target)
    prepared = (DiftTarget if protocol == "dift" else GeoawareTarget)(target_map, device)
    queries = []
    for source, points in sources:
        source_map = feature_map(source)
        if protocol == "dift":
            queries.append(source_map.vectors_at(points))
        else:
            row, column = geoaware_cells(source_map, points)
            queries.append(source[row, column])
    predicted, _ = match_queries(target_map, np.concatenate(queries), protocol, statistics, device, prepared)
    if device == "cuda":
        torch.cuda.synchronize()
    return np.split(predicted, len(sources))


def per_pair(seconds: list[float], pairs: int) -> float:
    return statistics.median(seconds) / pairs


def measure(channels: int, device: str, args) -> dict:
    groups = make_groups(channels, args.targets, args.pairs_per_target)
    exact_group(*groups[0], "dift", "basic", device)  # warm-up: allocator, kernels
    result = {"channels": channels, "device": device, "threads": torch.get_num_threads()}
    found = {}
    for name, protocol, stats in (("exact", "dift", "basic"), ("exact_no_stats", "dift", "none"),
                                  ("geoaware", "geoaware", "basic")):
        times, found[name] = [], []
        for target, sources in groups:
            start = time.perf_counter()
            found[name] += exact_group(target, sources, protocol, stats, device)
            times.append(time.perf_counter() - start)
        result[name] = per_pair(times, args.pairs_per_target)
    pairs = [(s, t, p) for t, sources in groups for s, p in sources]
    times, previous = [], []
    for target, sources in groups[: max(1, args.previous_targets)]:
        start = time.perf_counter()
        target_map = feature_map(target)
        previous += [previous_dift(feature_map(s), target_map, p)[0] for s, p in sources]
        times.append(time.perf_counter() - start)
    result["previous"] = per_pair(times, args.pairs_per_target)
    times, same, total = [], 0, 0
    for (source, target, points), mine in list(zip(pairs, found["exact"]))[: args.naive_pairs]:
        start = time.perf_counter()
        expected = naive_dift(source, target, points, device)
        times.append(time.perf_counter() - start)
        same += int((expected == mine).all(axis=1).sum())
        total += len(points)
    result["naive"] = statistics.median(times)
    times = []
    for source, target, points in pairs[: args.naive_pairs]:
        start = time.perf_counter()
        vectorised_naive(source, target, points, device)
        times.append(time.perf_counter() - start)
    result["vectorised_naive"] = statistics.median(times)
    result["identical_naive"] = [same, total]
    result["identical_previous"] = [int(sum((a == b).all(axis=1).sum() for a, b in zip(previous, found["exact"]))),
                                    sum(len(p) for p in previous)]
    return result


def report(r: dict) -> str:
    rate = {k: 1 / r[k] for k in ("naive", "vectorised_naive", "previous", "exact", "exact_no_stats", "geoaware")}
    a, b = r["identical_naive"]
    c, d = r["identical_previous"]
    return (f"{r['device']:>4} {r['threads']:>2} thr {r['channels']:>5} ch | naive {rate['naive']:6.3f} (vectorised "
            f"{rate['vectorised_naive']:5.2f}) | previous "
            f"{rate['previous']:7.1f} | exact {rate['exact']:7.1f} (no stats {rate['exact_no_stats']:7.1f}) | geoaware "
            f"{rate['geoaware']:7.1f} pairs/s | exact/naive {r['naive'] / r['exact']:6.0f}x (/vectorised "
            f"{r['vectorised_naive'] / r['exact']:4.0f}x), exact/previous "
            f"{r['previous'] / r['exact']:5.1f}x | identical argmax: naive {a}/{b}, previous {c}/{d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--pairs-per-target", type=int, default=7)
    parser.add_argument("--previous-targets", type=int, default=2)
    parser.add_argument("--naive-pairs", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[1280, 1536])
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "match.json",
                        help="Where the figures go (read by `python cli.py plan`).")
    parser.add_argument("--worker", choices=["cpu", "cuda"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one process per thread count: BLAS pools are sized once per process
        print(json.dumps([measure(c, args.worker, args) for c in args.channels]))
        return
    runs = [("cpu", 1), ("cpu", 2)] + ([("cuda", 2)] if torch.cuda.is_available() else [])
    results = []
    for device, threads in runs:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads)}
        command = [sys.executable, __file__, "--worker", device, "--targets", str(args.targets),
                   "--pairs-per-target", str(args.pairs_per_target), "--previous-targets", str(args.previous_targets),
                   "--naive-pairs", str(args.naive_pairs), "--channels", *map(str, args.channels)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            results.append(r)
            print(report(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    head = next(r for r in results if r["device"] == "cpu" and r["threads"] == 2 and r["channels"] == args.channels[0])
    a, b = head["identical_naive"]
    print(f"exact: {1 / head['exact']:.1f} pairs/s, naive: {1 / head['naive']:.3f} pairs/s, "
          f"speedup: {head['naive'] / head['exact']:.0f}x, identical argmax: {a}/{b}")


if __name__ == "__main__":
    main()
