"""PCK as DIFT evaluates SPair-71k.

A prediction is correct when `distance / max(x2 - x1, y2 - y1) <= alpha`, with the target's box
(no +1). "Per image" PCK is the mean over pairs of each pair's fraction correct; "per point" PCK is
correct keypoints over all keypoints. Both are reported pooled over all pairs, per category, and as
the mean of the per-category values.

A predictions table has one row per (pair, keypoint, feature variant). Columns named in
`PREDICTION_COLUMNS` describe the keypoint; columns starting with `sim_` are similarity statistics;
every other column (backbone, layer, timestep, protocol, ...) names a feature variant, and PCK is
computed separately for each combination of their values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

ALPHAS = (0.01, 0.05, 0.1, 0.15)
HEADLINE_ALPHA = 0.1
PREDICTION_COLUMNS = (
    "split", "pair", "pair_id", "category", "src_image", "trg_image", "keypoint",
    "src_x", "src_y", "trg_x", "trg_y", "pred_x", "pred_y", "threshold", "distance",
)
REQUIRED_COLUMNS = ("pair", "category", "trg_x", "trg_y", "pred_x", "pred_y", "threshold")


def bbox_threshold(bndbox) -> float:
    """DIFT's PCK normaliser: the longer side of the target box, no +1."""
    x1, y1, x2, y2 = bndbox
    return float(max(x2 - x1, y2 - y1))


def variant_columns(predictions: pd.DataFrame) -> list[str]:
    return [c for c in predictions.columns if c not in PREDICTION_COLUMNS and not c.startswith("sim_")]


def pck_table(predictions: pd.DataFrame, alphas=ALPHAS) -> pd.DataFrame:
    """Tidy PCK: one row per (variant..., category, kind, alpha).

    `category` is a category name, "all" (pooled over every pair) or "mean" (mean of categories);
    `kind` is "per_image" or "per_point".
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise PipelineError(None, "predictions", f"missing columns {missing}")
    if predictions.empty:
        raise PipelineError(None, "predictions", "no rows")
    variants = variant_columns(predictions)
    distance = np.hypot(
        predictions["pred_x"].to_numpy(float) - predictions["trg_x"].to_numpy(float),
        predictions["pred_y"].to_numpy(float) - predictions["trg_y"].to_numpy(float),
    )
    ratio = distance / predictions["threshold"].to_numpy(float)
    frames = []
    for alpha in alphas:
        scored = predictions[variants + ["category", "pair"]].copy()
        scored["correct"] = ratio <= alpha
        per_pair = scored.groupby(variants + ["category", "pair"], sort=True)["correct"].agg(["mean", "sum", "size"])
        per_pair = per_pair.reset_index()
        for scope in ("category", "all"):
            keys = variants + (["category"] if scope == "category" else [])
            grouped = per_pair.groupby(keys, sort=True) if keys else per_pair.groupby(lambda _: 0)
            summary = grouped.agg(
                per_image=("mean", "mean"), correct=("sum", "sum"), points=("size", "sum"), pairs=("pair", "size")
            ).reset_index()
            if scope == "all":
                summary = summary.drop(columns="index", errors="ignore")
                summary["category"] = "all"
            summary["per_point"] = summary["correct"] / summary["points"]
            frames.append(summary.assign(alpha=alpha))
            if scope == "category":
                mean = summary.groupby(variants, sort=True) if variants else summary.groupby(lambda _: 0)
                mean = mean.agg(per_image=("per_image", "mean"), per_point=("per_point", "mean"),
                                points=("points", "sum"), pairs=("pairs", "sum")).reset_index()
                mean = mean.drop(columns="index", errors="ignore")
                frames.append(mean.assign(category="mean", alpha=alpha))
    wide = pd.concat(frames, ignore_index=True).drop(columns="correct")
    tidy = wide.melt(
        id_vars=variants + ["category", "alpha", "pairs", "points"],
        value_vars=["per_image", "per_point"], var_name="kind", value_name="pck",
    )
    order = variants + ["kind", "category", "alpha"]
    return tidy[order + ["pck", "pairs", "points"]].sort_values(order, kind="stable").reset_index(drop=True)


def variant_label(row: pd.Series, variants: list[str]) -> str:
    return ",".join(f"{c}={row[c]}" for c in variants) if variants else "all"


def metrics_summary(table: pd.DataFrame) -> dict:
    """The JSON DVC shows: pooled and mean-of-categories PCK per variant and alpha."""
    variants = [c for c in table.columns if c not in ("kind", "category", "alpha", "pck", "pairs", "points")]
    summary: dict = {}
    for _, row in table[table["category"].isin(["all", "mean"])].iterrows():
        entry = summary.setdefault(variant_label(row, variants), {})
        section = row["kind"] if row["category"] == "all" else f"{row['kind']}_mean_of_categories"
        entry.setdefault(section, {})[f"pck@{row['alpha']:g}"] = round(float(row["pck"]), 6)
    return summary


def write_metrics(predictions: pd.DataFrame, json_path: str | Path, csv_path: str | Path) -> pd.DataFrame:
    table = pck_table(predictions)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(metrics_summary(table), indent=2) + "\n")
    table.to_csv(csv_path, index=False, float_format="%.6f")
    return table


def read_predictions(paths) -> pd.DataFrame:
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_parquet(path))
        except (OSError, ValueError) as exc:
            raise PipelineError(path, None, f"unreadable predictions table ({exc})") from None
    return pd.concat(frames, ignore_index=True)


def format_headline(table: pd.DataFrame) -> str:
    """PCK@0.1 per variant: pooled per image and per point, and mean of categories."""
    head = table[(table["alpha"] == HEADLINE_ALPHA) & table["category"].isin(["all", "mean"])]
    variants = [c for c in table.columns if c not in ("kind", "category", "alpha", "pck", "pairs", "points")]
    wide = head.pivot_table(index=variants or None, columns=["kind", "category"], values="pck", sort=True) \
        if variants else head.set_index(["kind", "category"])["pck"].to_frame().T
    wide.columns = [f"{kind}:{cat}" for kind, cat in wide.columns]
    return f"PCK@{HEADLINE_ALPHA:g}\n" + wide.to_string(float_format=lambda v: f"{v:.3f}")
