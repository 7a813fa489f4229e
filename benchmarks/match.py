"""Matching cost at realistic sizes: 1280 x 48 x 48 features, 500 x 333 images, 20 keypoints a pair.

Prints, from one run: pairs/s of the `dift` protocol (exact, at feature resolution), of a naive
implementation of the same protocol (DIFT's code: upsample both maps to the images, normalise,
matrix product, argmax), and of `fast` (FAISS top-k + exact refinement); the fraction of identical
argmaxes (dift vs naive, fast vs dift). As in `match_store`, each target image serves several pairs
(SPair's test split averages ~14 pairs per image), so what is built once per target (the norm map,
the FAISS index) is built once per target here too; times are per pair, medians over targets.

    python benchmarks/match.py [--targets 5] [--pairs-per-target 4] [--naive-pairs 4] [--channels 1280]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.matching.protocols import FeatureMap, TargetIndex, match_dift, match_fast

WIDTH, HEIGHT, GRID = 500, 333, 48


def smooth_features(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Spatially correlated features (as a network's are), (48, 48, C) float32."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, 12, 12)).astype(np.float32))
    up = F.interpolate(coarse, size=(GRID, GRID), mode="bilinear", align_corners=False)[0]
    return (up.permute(1, 2, 0).numpy() + 0.3 * rng.standard_normal((GRID, GRID, channels))).astype(np.float32)


def feature_map(features: np.ndarray) -> FeatureMap:
    return FeatureMap(features, WIDTH, HEIGHT, valid_x1=768.0, valid_y1=768.0, stride=16.0)


def naive_dift(source: np.ndarray, target: np.ndarray, points: np.ndarray) -> np.ndarray:
    """DIFT's evaluation as its code does it, float32 on the CPU."""
    up = lambda f: F.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None], size=(HEIGHT, WIDTH),  # noqa: E731
                                 mode="bilinear", align_corners=False)[0]
    src, trg = up(source), up(target)
    vectors = F.normalize(src[:, points[:, 1], points[:, 0]].T, dim=1)
    cos = vectors @ F.normalize(trg.reshape(trg.shape[0], -1), dim=0)
    flat = cos.argmax(dim=1).numpy()
    return np.stack([flat % WIDTH, flat // WIDTH], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--pairs-per-target", type=int, default=4)
    parser.add_argument("--naive-pairs", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    groups = []
    for _ in range(args.targets):
        target_features = smooth_features(rng, args.channels)
        sources = []
        for _ in range(args.pairs_per_target):
            # A source: the target shifted by a few cells plus noise, so each keypoint has a true peak.
            source = np.roll(target_features, shift=tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
            source = source + 0.5 * rng.standard_normal(source.shape).astype(np.float32)
            points = np.stack([rng.integers(0, WIDTH, 20), rng.integers(0, HEIGHT, 20)], axis=1)
            sources.append((source, points))
        groups.append((target_features, sources))

    dift_times, fast_times, naive_times = [], [], []
    dift_points, fast_points, pairs = [], [], []
    for target_features, sources in groups:
        start = time.perf_counter()
        target = feature_map(target_features)
        for source, points in sources:
            predicted, _ = match_dift(feature_map(source), target, points)
            dift_points.append(predicted)
        dift_times.append((time.perf_counter() - start) / len(sources))
        start = time.perf_counter()
        index = TargetIndex(feature_map(target_features))
        for source, points in sources:
            predicted, _ = match_fast(feature_map(source), index, points, args.top_k)
            fast_points.append(predicted)
        fast_times.append((time.perf_counter() - start) / len(sources))
        pairs += [(source, target_features, points) for source, points in sources]
    naive_same = naive_total = 0
    for (source, target, points), mine in list(zip(pairs, dift_points))[: args.naive_pairs]:
        start = time.perf_counter()
        expected = naive_dift(source, target, points)
        naive_times.append(time.perf_counter() - start)
        naive_same += (expected == mine).all(axis=1).sum()
        naive_total += len(points)
    fast_same = sum((a == b).all(axis=1).sum() for a, b in zip(dift_points, fast_points))
    total = sum(len(p) for _, _, p in pairs)

    dift, fast, naive = (statistics.median(t) for t in (dift_times, fast_times, naive_times))
    print(f"{args.channels} x {GRID} x {GRID} features, {WIDTH} x {HEIGHT} images, 20 keypoints a pair; "
          f"torch threads {torch.get_num_threads()}; {len(pairs)} pairs over {len(groups)} targets")
    print(f"naive (upsample, cosine, argmax): {naive:.3f} s/pair = {1 / naive:.2f} pairs/s ({len(naive_times)} pairs)")
    print(f"dift  (exact, feature resolution): {dift:.4f} s/pair = {1 / dift:.1f} pairs/s; "
          f"speed-up over naive {naive / dift:.0f}x")
    print(f"fast  (FAISS top-{args.top_k} + exact refine): {fast:.4f} s/pair = {1 / fast:.1f} pairs/s; "
          f"speed-up over dift {dift / fast:.1f}x")
    print(f"identical argmax: dift vs naive {naive_same}/{naive_total} ({naive_same / naive_total:.2%}); "
          f"fast vs dift {fast_same}/{total} ({fast_same / total:.2%})")


if __name__ == "__main__":
    main()
