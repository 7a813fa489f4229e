"""Predictions as an xarray Dataset, for analysis across variants.

Two dimensions: `point` (a pair's keypoint, labelled `<pair>#<keypoint>`, in (pair, keypoint) order)
and `variant`, a pandas MultiIndex over the variant columns (backbone, layer, timestep, transform,
protocol, ...) holding only the combinations that occur in the predictions, sorted. Stores have
different layers (SD2 has up_blocks, SD3 transformer_blocks), so the full product of the variant
columns would be mostly empty; this layout costs points x variants present, whatever the columns.

Each variant column is a level coordinate of `variant`, so xarray selects on it directly:
`ds.sel(backbone="sd3")` keeps that backbone's variants (dropping the level),
`ds.sel(layer="up_blocks.1", timestep=261)` selects on several levels, and naming every level picks one
variant. For a dense view of a selection, `.unstack("variant")`; for pandas, `.to_series()`.

pair, category, keypoint, src_image, trg_image, trg_x, trg_y and threshold are coordinates along
`point`; every other column (pred_x, pred_y, distance, sim_*, ...) is a data variable on (point,
variant). A point a variant has no prediction for is NaN there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.data.predictions import read_predictions, variant_columns
from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import THRESHOLDS, verdicts

POINT_COORDS = ["pair", "category", "keypoint", "src_image", "trg_image", "trg_x", "trg_y", "threshold"]


def load_predictions(source: str | Path | list | pd.DataFrame) -> xr.Dataset:
    """A predictions table (a DataFrame, a parquet file, a list of them, or a folder of them) as a Dataset
    on (point, variant)."""
    if isinstance(source, pd.DataFrame):
        frame = source
    else:
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        paths = [p for path in paths for p in (sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [path])]
        frame = read_predictions(paths)
    variants = variant_columns(frame)
    if not variants:
        raise PipelineError(None, "predictions", "no variant columns (backbone, layer, ...)")
    missing = [c for c in ("pair", "keypoint") if c not in frame.columns]
    if missing:
        raise PipelineError(None, "predictions", f"missing columns {missing}")

    # Integer codes of every row's point and variant, in sorted order; only what occurs gets a code.
    point_code = frame.groupby(["pair", "keypoint"], sort=True, dropna=False).ngroup().to_numpy()
    by_variant = frame.groupby(variants, sort=True, dropna=False)
    variant_code = by_variant.ngroup().to_numpy()
    present = by_variant.size().index
    if not isinstance(present, pd.MultiIndex):  # a single variant column
        present = pd.MultiIndex.from_arrays([present], names=variants)
    _, first_row = np.unique(point_code, return_index=True)
    n_points, n_variants = len(first_row), len(present)

    cell = point_code.astype(np.int64) * n_variants + variant_code
    repeated = np.count_nonzero(np.diff(np.sort(cell)) == 0)
    if repeated:
        raise PipelineError(None, "predictions", f"{repeated} rows repeat a (point, variant) of another row "
                                                 "(the same table read twice?)")
    complete = len(cell) == n_points * n_variants

    firsts = frame.iloc[first_row]
    labels = firsts["pair"].astype(str).to_numpy(object) + "#" + firsts["keypoint"].astype(str).to_numpy(object)
    coords = xr.Coordinates.from_pandas_multiindex(present, "variant")
    values = [c for c in frame.columns if c not in POINT_COORDS and c not in variants and c != "split"]
    dataset = xr.Dataset(
        {c: (("point", "variant"), _cells(frame[c], cell, (n_points, n_variants), complete)) for c in values},
        coords=coords,
    )
    point_coords = {c: ("point", firsts[c].to_numpy()) for c in POINT_COORDS if c in frame.columns}
    dataset = dataset.assign_coords(point=labels.astype(str), **point_coords)
    dataset.attrs["variant_columns"] = list(variants)
    return dataset


def _cells(column: pd.Series, cell: np.ndarray, shape: tuple[int, int], complete: bool) -> np.ndarray:
    """One column's values on the (point, variant) grid; NaN where a variant has no prediction for a
    point (integers and booleans then become floats)."""
    size = shape[0] * shape[1]
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_integer_dtype(column):
        if complete and not column.hasnans:
            values = column.to_numpy()
            out = np.empty(size, values.dtype)
        else:
            values, out = column.to_numpy(float, na_value=np.nan), np.full(size, np.nan)
    elif pd.api.types.is_float_dtype(column):
        dtype = np.float32 if column.dtype == np.float32 else np.float64
        values, out = column.to_numpy(dtype, na_value=np.nan), np.full(size, np.nan, dtype)
    else:
        values, out = column.to_numpy(object, na_value=np.nan), np.full(size, np.nan, object)
    out[cell] = values
    return out.reshape(shape)


def correct(dataset: xr.Dataset, alpha: float = 0.1, threshold_by: str = "bbox") -> xr.DataArray:
    """1.0 where a prediction is correct at `alpha` by threshold family `threshold_by` (bbox: the target box's
    longer side; img: the target image's), 0.0 where not, NaN where there is none: the rule PCK counts with
    (pipeline.evaluation.metrics.verdicts: each protocol's own, on its canvas where a row has one)."""
    if threshold_by not in THRESHOLDS:
        raise PipelineError(None, "threshold", f"unknown threshold family {threshold_by!r}; expected one of {list(THRESHOLDS)}")
    names = ["trg_x", "trg_y", "pred_x", "pred_y", THRESHOLDS[threshold_by], "protocol", "canvas_scale", "canvas_x0",
             "canvas_y0"]
    present = [name for name in names if name in dataset.variables]
    missing = [name for name in names[:5] if name not in present]
    if missing:
        raise PipelineError(None, "predictions", f"missing columns {missing}")
    predicted = dataset["pred_x"]
    columns = {name: dataset[name].broadcast_like(predicted).transpose(*predicted.dims).values.reshape(-1)
               for name in present}
    found = verdicts(columns, [alpha], threshold_by)[0].reshape(predicted.shape)
    return predicted.copy(data=found.astype(float)).where(predicted.notnull()).rename("correct")
