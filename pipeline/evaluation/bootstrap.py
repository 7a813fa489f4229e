"""Uncertainty of the study's headline numbers: a paired bootstrap over pairs.

Per-image PCK is a mean over pairs, so its sampling uncertainty is that of the pairs: each resample draws
as many pairs as there are, with replacement, and recomputes every backbone's PCK on the SAME draw. The
percentile interval of those values is the 95% interval of a backbone's PCK; of their differences, the
interval of the difference between two backbones (paired: pairs hard for one model tend to be hard for
the other, so the difference is tighter than the two intervals suggest). None of the published SPair
evaluations report one.

A pair some backbone has no score for (left out under `on_error: skip`) counts only where it exists: a
backbone's PCK is the mean over its own pairs, and a difference the mean over the pairs both have.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

CONFIDENCE = 0.95


def intervals(outcomes: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From `metrics.pair_outcomes` (backbone, pair, correct, points): per backbone its per-image PCK and 95%
    interval (backbone, pck, low, high, pairs), and per two backbones, the better first, their difference
    (minuend, subtrahend, difference, low, high, pairs)."""
    scores = (outcomes.assign(score=outcomes["correct"] / outcomes["points"])
              .pivot(index="pair", columns="backbone", values="score").sort_index())
    values = scores.to_numpy(np.float64)
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    n = len(scores)
    # How often each pair is drawn in each resample; the same draws for every backbone and difference.
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    tails = [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2]

    def summary(column: np.ndarray, weight: np.ndarray) -> tuple[float, float, float]:
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = (counts @ column) / (counts @ weight)
        low, high = np.nanquantile(resampled, tails)
        return float(column.sum() / weight.sum()), float(low), float(high)

    backbones = list(scores.columns)
    rows = []
    for i, backbone in enumerate(backbones):
        pck, low, high = summary(filled[:, i], present[:, i].astype(np.float64))
        rows.append({"backbone": backbone, "pck": pck, "low": low, "high": high, "pairs": int(present[:, i].sum())})
    per_backbone = pd.DataFrame(rows, columns=["backbone", "pck", "low", "high", "pairs"])

    rows = []
    for i, j in combinations(range(len(backbones)), 2):
        both = (present[:, i] & present[:, j]).astype(np.float64)
        if not both.any():
            continue
        difference, low, high = summary((filled[:, i] - filled[:, j]) * both, both)
        if difference < 0:
            i, j, difference, low, high = j, i, -difference, -high, -low
        rows.append({"minuend": backbones[i], "subtrahend": backbones[j], "difference": difference,
                     "low": low, "high": high, "pairs": int(both.sum())})
    differences = pd.DataFrame(rows, columns=["minuend", "subtrahend", "difference", "low", "high", "pairs"])
    return per_backbone, differences.sort_values("difference", ascending=False, kind="stable").reset_index(drop=True)
