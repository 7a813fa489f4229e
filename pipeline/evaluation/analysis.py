"""Predictions as an xarray Dataset, for analysis across variants.

One `point` dimension (a pair's keypoint) and one dimension per variant column (backbone, layer,
timestep, protocol, ...); pair, category and keypoint are coordinates along `point`. Variant
combinations a store does not have (SD2 has no transformer_blocks) are NaN.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import xarray as xr

from pipeline.evaluation.metrics import read_predictions, variant_columns

POINT_COORDS = ["pair", "category", "keypoint", "src_image", "trg_image", "trg_x", "trg_y", "threshold"]


def load_predictions(source: str | Path | list | pd.DataFrame) -> xr.Dataset:
    """A predictions table (a DataFrame, a parquet file, a list of them, or a folder of them)."""
    if isinstance(source, pd.DataFrame):
        frame = source
    else:
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        paths = [p for path in paths for p in (sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [path])]
        frame = read_predictions(paths)
    variants = variant_columns(frame)
    frame = frame.assign(point=frame["pair"].astype(str) + "#" + frame["keypoint"].astype(str))
    points = frame.drop_duplicates("point").set_index("point")[POINT_COORDS]
    values = frame.set_index(["point", *variants])
    data = values[[c for c in values.columns if c not in POINT_COORDS and c != "split"]]
    dataset = data.to_xarray()
    return dataset.assign_coords({c: ("point", points.loc[dataset["point"].values, c].to_numpy()) for c in POINT_COORDS})


def correct(dataset: xr.Dataset, alpha: float = 0.1) -> xr.DataArray:
    """1.0 where a prediction is within alpha x the target box's longer side, NaN where there is none."""
    return (dataset["distance"] / dataset["threshold"] <= alpha).astype(float).where(dataset["distance"].notnull())
