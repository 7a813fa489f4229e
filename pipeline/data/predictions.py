"""The predictions table: what `match` writes (pipeline.matching.match) and `evaluate` scores
(pipeline.evaluation.metrics), one parquet file per backbone.

A predictions table has one row per (pair, keypoint, feature variant). Columns named in
`PREDICTION_COLUMNS` describe the keypoint; columns starting with `sim_` are similarity statistics;
every other column (backbone, layer, timestep, protocol, ...) names a feature variant, and PCK is
computed separately for each combination of their values and each threshold family scored.

A table records what it covers under `COVERAGE_KEY` (parquet metadata, or DataFrame.attrs): the pairs of
the split per category and the pairs left out, with their reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

PREDICTION_COLUMNS = (
    "split", "pair", "pair_id", "category", "src_image", "trg_image", "keypoint",
    "src_x", "src_y", "trg_x", "trg_y", "pred_x", "pred_y", "threshold", "image_size", "distance", "dropped_channels",
    "canvas_scale", "canvas_x0", "canvas_y0",
)
REQUIRED_COLUMNS = ("pair", "category", "trg_x", "trg_y", "pred_x", "pred_y", "threshold")
# A predictions table's record of what it covers (parquet metadata, or DataFrame.attrs):
# {"pairs": {category: pairs of the split}, "skipped": [[pair, category, reason], ...]}.
COVERAGE_KEY = "dift_cache.coverage"


def bbox_threshold(bndbox) -> float:
    """DIFT's PCK normaliser (column `threshold`): the longer side of the target box, no +1."""
    x1, y1, x2, y2 = bndbox
    return float(max(x2 - x1, y2 - y1))


def variant_columns(predictions: pd.DataFrame) -> list[str]:
    """The columns that name a feature variant (neither a keypoint's nor a similarity statistic)."""
    return [c for c in predictions.columns if c not in PREDICTION_COLUMNS and not c.startswith("sim_")]


def read_predictions(paths) -> pd.DataFrame:
    """Predictions tables, concatenated (an unreadable one is a one-line error)."""
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_parquet(path))
        except (OSError, ValueError) as exc:
            raise PipelineError(path, None, f"unreadable predictions table ({exc})") from None
    return pd.concat(frames, ignore_index=True)


def read_coverage(path: str | Path) -> dict | None:
    """The coverage a predictions table records (None for a table written without it)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(COVERAGE_KEY.encode())
    return json.loads(raw) if raw else None
