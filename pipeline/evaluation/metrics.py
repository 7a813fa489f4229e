"""PCK as the published evaluations count it on SPair-71k.

A prediction is correct when `distance / size <= alpha` (DIFT; `<` strictly for the `geoaware` and
`sd-dino` protocols, as GeoAware-SC and sd-dino count), where `size` is, per threshold family (`threshold_by`):
- `bbox`: the longer side of the target's box, no +1 (DIFT, sd-dino, GeoAware-SC; column `threshold`);
- `img`: the longer side of the target image (CleanDIFT's alpha_img; column `image_size`).
Rows of `geoaware` / `sd-dino` that carry a canvas frame (`canvas_scale` s, `canvas_x0`, `canvas_y0`: the
target on a canvas that keeps aspect, canvas = image x s + offset) are judged exactly as GeoAware-SC's
`compute_pck` judges (Junyi42/GeoAware-SC @ 166f873, pck_train.py; sd-dino's is the same): in canvas
units, the truth as float32(point) x float32(s) + offset, the prediction back on the canvas in float32,
their distance by torch's float32 norm, and `distance < float32(alpha) x size x s` (bbox: that product in
float64, as their thresholds are; img: float32(alpha) x canvas in float32). `verdicts` is the one home of
this rule (pair_scores and pipeline.evaluation.analysis use it).
"Per image" PCK is the mean over pairs of each pair's fraction correct; "per point" PCK is correct
keypoints over all keypoints. Both are reported pooled over all pairs, per category, and as the mean of
the per-category values.

The predictions table scored here (its columns, its variant columns, its coverage) is described in
pipeline.data.predictions; PCK is computed separately for each feature variant and each threshold family scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.data.predictions import COVERAGE_KEY, REQUIRED_COLUMNS, read_coverage, variant_columns
from pipeline.errors import PipelineError

ALPHAS = (0.01, 0.05, 0.1, 0.15)
HEADLINE_ALPHA = 0.1
BEST_DIR = "metrics/best"  # each backbone's best variant, one JSON file each (the `evaluate` stage)
THRESHOLDS = {"bbox": "threshold", "img": "image_size"}  # threshold family: the column of sizes it scales
STRICT_PROTOCOLS = ("geoaware", "sd-dino")  # count distance < alpha x size (on their canvas where a row has one); the others <=


# The setting of every headline number: DIFT's (its protocol, alpha x the longer side of the target's box,
# per image, PCK@0.1, pooled over all pairs). A number in another setting says which.
HEADLINE = {"protocol": "dift", "threshold_by": "bbox", "kind": "per_image", "alpha": HEADLINE_ALPHA, "category": "all"}
MEASURE_COLUMNS = ("kind", "category", "alpha", "pck", "pairs", "split_pairs", "points")  # of a pck_table row
FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")  # SPair's per-pair difficulty flags


def verdicts(columns, alphas=ALPHAS, family: str = "bbox") -> np.ndarray:
    """(len(alphas), N) booleans: is each prediction correct at each alpha, by threshold family `family` (the
    rule of the module docstring). `columns` maps the predictions table's column names to N values each (a
    DataFrame, or a dict of arrays): trg_x, trg_y, pred_x, pred_y, the family's size column, and where
    present `protocol` and the canvas frame (canvas_scale, canvas_x0, canvas_y0)."""
    def get(name):
        return np.asarray(columns[name], dtype=np.float64).reshape(-1)

    trg = np.stack([get("trg_x"), get("trg_y")], 1)
    pred = np.stack([get("pred_x"), get("pred_y")], 1)
    size = get(THRESHOLDS[family])
    n = len(size)
    strict = np.isin(np.asarray(columns["protocol"]).reshape(-1), STRICT_PROTOCOLS) if "protocol" in columns \
        else np.zeros(n, bool)
    alpha = np.asarray(alphas, dtype=np.float64)[:, None]
    ratio = np.hypot(pred[:, 0] - trg[:, 0], pred[:, 1] - trg[:, 1]) / size
    correct = np.where(strict, ratio < alpha, ratio <= alpha)
    scale = get("canvas_scale") if "canvas_scale" in columns else np.full(n, np.nan)
    on_canvas = strict & np.isfinite(scale)
    if on_canvas.any():
        s = scale[on_canvas]
        offset = np.stack([get("canvas_x0"), get("canvas_y0")], 1)[on_canvas]
        truth = trg[on_canvas].astype(np.float32) * s.astype(np.float32)[:, None] + offset.astype(np.float32)
        # The prediction was a float32 canvas point mapped to image pixels in float64: back exactly.
        guess = (pred[on_canvas] * s[:, None] + offset).astype(np.float32)
        difference = (truth - guess)[:, ::-1].copy()  # (y, x), as they compare [:, [1, 0]]
        # Their distance is torch's float32 norm; numpy rounds differently in the last bit.
        error = torch.linalg.vector_norm(torch.from_numpy(difference), dim=-1).numpy()  # float32
        alpha32 = np.asarray(alphas, dtype=np.float32)[:, None]
        if family == "img":  # alpha x ANNO_SIZE, a float32 tensor
            correct[:, on_canvas] = error < alpha32 * (size[on_canvas] * s).astype(np.float32)
        else:  # alpha x their float64 thresholds (box side x s): the float32 alpha promoted
            correct[:, on_canvas] = error.astype(np.float64) < alpha32.astype(np.float64) * (size[on_canvas] * s)
    return correct


def pair_scores(predictions: pd.DataFrame, alphas=ALPHAS, thresholds=("bbox",)) -> pd.DataFrame:
    """Per (variant..., threshold_by, category, pair, alpha): keypoints `correct` and keypoints `points`.

    Counts add up over any split of the rows, so shards of a predictions table can be scored
    separately (on dask workers) and summed: `pck_table` gives the same numbers either way.
    """
    unknown = [t for t in thresholds if t not in THRESHOLDS]
    if unknown:
        raise PipelineError(None, "threshold", f"unknown threshold family {unknown[0]!r}; expected one of {list(THRESHOLDS)}")
    missing = [c for c in REQUIRED_COLUMNS + tuple(THRESHOLDS[t] for t in thresholds) if c not in predictions.columns]
    if missing:
        raise PipelineError(None, "predictions", f"missing columns {sorted(set(missing))}")
    keys = variant_columns(predictions) + ["category", "pair"]
    frames = []
    for family in thresholds:
        for alpha, correct in zip(alphas, verdicts(predictions, alphas, family)):
            scored = predictions[keys].copy()
            scored["correct"] = correct.astype(np.int64)
            counts = scored.groupby(keys, sort=True)["correct"].agg(correct="sum", points="size").reset_index()
            frames.append(counts.assign(alpha=alpha, threshold_by=family))
    scores = pd.concat(frames, ignore_index=True)
    variants = keys[:-2] + ["threshold_by"]
    return scores[variants + ["category", "pair", "correct", "points", "alpha"]]


def pck_table(predictions: pd.DataFrame, alphas=ALPHAS, thresholds=("bbox",)) -> pd.DataFrame:
    """Tidy PCK: one row per (variant..., category, kind, alpha).

    `category` is a category name, "all" (pooled over every pair) or "mean" (mean of categories);
    `kind` is "per_image" or "per_point".
    """
    if predictions.empty:
        raise PipelineError(None, "predictions", "no rows")
    scores = pair_scores(predictions, alphas, thresholds)
    return with_coverage(pck_from_scores(scores), [_split_pairs(scores, predictions.attrs.get(COVERAGE_KEY))])


def _split_pairs(scores: pd.DataFrame, coverage: dict | None) -> pd.DataFrame:
    """(variant..., category, split_pairs) for the variants of one table's scores: the pairs of the split
    per category, as its coverage records (without one: the pairs scored, as nothing says otherwise)."""
    variants = [c for c in scores.columns if c not in ("category", "pair", "alpha", "correct", "points")]
    scored = scores.groupby(variants + ["category"], sort=True)["pair"].nunique().rename("split_pairs").reset_index()
    if coverage is None:
        return scored
    combos = scored[variants].drop_duplicates() if variants else pd.DataFrame(index=[0])
    split = pd.DataFrame({"category": list(coverage["pairs"]), "split_pairs": list(coverage["pairs"].values())})
    return combos.merge(split, how="cross") if variants else split


def with_coverage(table: pd.DataFrame, split_pairs: list[pd.DataFrame]) -> pd.DataFrame:
    """`table` with `split_pairs` beside `pairs`: how many pairs of the split each row could have scored
    (categories: their own; "all" and "mean": the whole split)."""
    split = pd.concat(split_pairs, ignore_index=True)
    variants = [c for c in split.columns if c not in ("category", "split_pairs")]
    split = split.groupby(variants + ["category"], sort=False, as_index=False)["split_pairs"].max()
    whole = split.groupby(variants, sort=False, as_index=False)["split_pairs"].sum() if variants \
        else pd.DataFrame({"split_pairs": [split["split_pairs"].sum()]})
    whole = pd.concat([whole.assign(category=name) for name in ("all", "mean")], ignore_index=True)
    merged = table.merge(pd.concat([split, whole], ignore_index=True), on=variants + ["category"], how="left")
    merged["split_pairs"] = merged["split_pairs"].fillna(merged["pairs"]).astype(np.int64)
    return merged


def pck_from_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """`pck_table` from `pair_scores` (of one table, or the concatenated scores of its shards)."""
    variants = [c for c in scores.columns if c not in ("category", "pair", "alpha", "correct", "points")]
    per_pair = scores.groupby(variants + ["alpha", "category", "pair"], sort=True)[["correct", "points"]].sum()
    per_pair = per_pair.reset_index()
    per_pair["mean"] = per_pair["correct"] / per_pair["points"]
    frames = []
    for alpha, at_alpha in per_pair.groupby("alpha", sort=False):
        for scope in ("category", "all"):
            keys = variants + (["category"] if scope == "category" else [])
            grouped = at_alpha.groupby(keys, sort=True) if keys else at_alpha.groupby(lambda _: 0)
            summary = grouped.agg(
                per_image=("mean", "mean"), correct=("correct", "sum"), points=("points", "sum"), pairs=("pair", "size")
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


def score_files(paths, client=None, row_groups: int = 4, thresholds=("bbox",)) -> pd.DataFrame:
    """`pck_table` of predictions tables, read a few row groups at a time (so memory holds scores,
    not predictions); with a dask client the row groups are scored on its workers."""
    tasks = []
    for path in paths:
        try:
            count = pq.ParquetFile(path).num_row_groups
        except (OSError, ValueError) as exc:
            raise PipelineError(path, None, f"unreadable predictions table ({exc})") from None
        tasks += [(str(path), list(range(i, min(i + row_groups, count)))) for i in range(0, count, row_groups)]
    if client is None:
        scores = [_score_row_groups(path, groups, thresholds) for path, groups in tasks]
    else:
        scores = client.gather([client.submit(_score_row_groups, path, groups, thresholds, pure=False)
                                for path, groups in tasks])
    if not scores or all(s.empty for s in scores):
        raise PipelineError(None, "predictions", "no rows")
    by_file: dict[str, list] = {}
    for (path, _), part in zip(tasks, scores):
        by_file.setdefault(path, []).append(part)
    split_pairs = [_split_pairs(pd.concat(parts, ignore_index=True), read_coverage(path)) for path, parts in by_file.items()]
    return with_coverage(pck_from_scores(pd.concat(scores, ignore_index=True)), split_pairs)


def _score_row_groups(path: str, groups: list[int], thresholds) -> pd.DataFrame:
    try:
        frame = pq.ParquetFile(path).read_row_groups(groups).to_pandas()
    except (OSError, ValueError) as exc:
        raise PipelineError(path, None, f"unreadable predictions table ({exc})") from None
    try:
        return pair_scores(frame, thresholds=thresholds)
    except PipelineError as exc:
        raise PipelineError(path, exc.field, exc.reason) from None


def headline_setting(table: pd.DataFrame) -> dict:
    """HEADLINE, or where a table lacks DIFT's protocol or bbox thresholds (matched with geoaware only, say),
    the table's first protocol / threshold family instead."""
    setting = dict(HEADLINE)
    for column in ("protocol", "threshold_by"):
        if column in table and not (table[column] == setting[column]).any():
            setting[column] = sorted(table[column].unique())[0]
    return setting


def describe_setting(setting: dict) -> str:
    """A setting in words, e.g. `dift protocol, alpha x target box, per image, PCK@0.1, all pairs`."""
    parts = [f"{setting['protocol']} protocol"] if setting.get("protocol") else []
    if setting.get("threshold_by"):
        parts.append(f"alpha x target {'box' if setting['threshold_by'] == 'bbox' else 'image'}")
    if setting.get("kind"):
        parts.append(setting["kind"].replace("_", " "))
    if setting.get("alpha") is not None:
        parts.append(f"PCK@{setting['alpha']:g}")
    category = setting.get("category")
    if category is not None:
        parts.append({"all": "all pairs", "mean": "mean of categories"}.get(category, category))
    return ", ".join(parts)


def in_setting(table: pd.DataFrame, **changes) -> pd.DataFrame:
    """The rows of a `pck_table` in one setting: the table's headline setting with `changes` (a value of None
    keeps every value of that field). What is left has one row per variant (and per field set to None):
    numbers of different settings are never pooled, and a table that would be raises."""
    setting = {**headline_setting(table), **changes}
    rows = np.ones(len(table), bool)
    for column, value in setting.items():
        if value is not None and column in table:
            rows &= np.isclose(table[column], value) if column == "alpha" else (table[column] == value).to_numpy()
    chosen = table[rows]
    keys = [c for c in chosen.columns if c not in MEASURE_COLUMNS] + [c for c, v in setting.items() if v is None]
    if chosen.duplicated(keys).any():
        raise PipelineError(None, "pck table", f"several rows per variant in the setting {describe_setting(setting)}")
    return chosen.copy()


def at_headline(table: pd.DataFrame, kind: str | None = None, categories=("all",)) -> pd.DataFrame:
    """The rows of a `pck_table` at alpha 0.1 for `categories` ("all": pooled over pairs, "mean": mean of
    categories, or category names), of one `kind` (per_image, per_point) or both."""
    rows = np.isclose(table["alpha"], HEADLINE_ALPHA) & table["category"].isin(list(categories))
    if kind is not None:
        rows &= table["kind"] == kind
    return table[rows].copy()


def _headline(table: pd.DataFrame) -> pd.DataFrame:
    """PCK@0.1 per variant: columns per_image, per_point (pooled) and per_image_mean_of_categories, then the
    pairs scored of the split's (pairs, split_pairs)."""
    head = at_headline(table, categories=("all", "mean"))
    head["column"] = head["kind"] + np.where(head["category"] == "mean", "_mean_of_categories", "")
    variants = [c for c in table.columns if c not in ("kind", "category", "alpha", "pck", "pairs", "split_pairs", "points")]
    pooled = head[(head["category"] == "all") & (head["kind"] == "per_image")]
    if variants:
        wide = head.pivot_table(index=variants, columns="column", values="pck", sort=True)
        counts = pooled.set_index(variants)[["pairs", "split_pairs"]]
    else:
        wide, counts = head.set_index("column")["pck"].to_frame().T, pooled[["pairs", "split_pairs"]].set_index(wide_index := [0])
        wide.index = wide_index
    return wide[["per_image", "per_point", "per_image_mean_of_categories"]].join(counts)


def metrics_summary(table: pd.DataFrame) -> dict:
    """What `dvc metrics show` prints: PCK@0.1 nested by variant (backbone, layer, timestep, protocol, transform,
    threshold_by), then kind. Every alpha and category is in the tidy CSV."""
    summary: dict = {}
    for key, row in _headline(table).iterrows():
        node = summary
        for part in (key if isinstance(key, tuple) else (key,)):
            node = node.setdefault(str(part), {})
        node.update({name: int(value) if name in ("pairs", "split_pairs") else round(float(value), 6)
                     for name, value in row.items()})
    return {f"PCK@{HEADLINE_ALPHA:g}": summary}


def best_variants(table: pd.DataFrame) -> dict[str, dict]:
    """Per backbone: the variant with the best per-image PCK@0.1 in the headline setting (DIFT's: protocol
    dift, threshold by bbox, where the table has it), and its PCK@0.1 in that protocol and threshold family
    per image, per point and per image as the mean of categories. Ties go to the first variant in sorted order."""
    setting = headline_setting(table)
    head = _headline(table).reset_index()
    for column in ("protocol", "threshold_by"):
        if column in head:
            head = head[head[column] == setting[column]]
    if "backbone" not in head:
        head["backbone"] = "all"
    best = {}
    for backbone, rows in head.groupby("backbone"):
        row = rows.loc[rows["per_image"].idxmax()]
        best[str(backbone)] = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else
                                   int(v) if isinstance(v, (np.integer,)) else str(v))
                               for k, v in row.items() if k != "backbone"}
        best[str(backbone)]["alpha"] = HEADLINE_ALPHA
    return best


def write_metrics(table: pd.DataFrame, json_path: str | Path, csv_path: str | Path,
                  best_dir: str | Path | None = None, best: dict[str, dict] | None = None) -> pd.DataFrame:
    """Write a `pck_table`: the nested headline JSON, the tidy CSV, and the best variant per backbone
    (`best`: best_variants(table), with anything added to it, such as bootstrap intervals)."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(metrics_summary(table), indent=2) + "\n")
    table.to_csv(csv_path, index=False, float_format="%.6f")
    if best_dir is not None:
        Path(best_dir).mkdir(parents=True, exist_ok=True)
        for backbone, scores in (best if best is not None else best_variants(table)).items():
            (Path(best_dir) / f"{backbone}.json").write_text(json.dumps(scores, indent=2) + "\n")
    return table


def format_headline(table: pd.DataFrame) -> str:
    """PCK@0.1 per variant: pooled per image and per point, and the per-image mean of categories."""
    head = _headline(table)
    head["pairs"] = head["pairs"].astype(int).astype(str) + "/" + head.pop("split_pairs").astype(int).astype(str)
    return f"PCK@{HEADLINE_ALPHA:g} (pairs: scored/of the split)\n" + head.to_string(float_format=lambda v: f"{v:.3f}")


# The order a forward pass runs a model's block lists in (not their names' alphabetical order): a U-Net's down,
# mid then up blocks; FLUX's double-stream `transformer_blocks` before its `single_transformer_blocks`.
STAGE_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 0, "single_transformer_blocks": 1}


def layer_depth(layers) -> dict[str, float]:
    """Relative depth in (0, 1] of each module path among `layers`: by the forward order of its block list
    (STAGE_ORDER), then its block number."""
    def key(name: str):
        parts = name.split(".")
        return [STAGE_ORDER.get(parts[0], 0)] + [int(p) if p.isdigit() else p for p in parts]

    ordered = sorted(set(layers), key=key)
    return {name: (i + 1) / len(ordered) for i, name in enumerate(ordered)}


def curve_tables(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The headline setting's PCK against relative layer depth (each backbone at its best variant's timestep
    and transform) and against timestep (at its best variant's layer and transform): one series per backbone."""
    head = in_setting(table)
    for column, default in (("backbone", "all"), ("layer", "-"), ("timestep", 0), ("transform", "raw")):
        if column not in head:
            head[column] = default
    best = best_variants(table)
    by_layer, by_time = [], []
    for backbone, rows in head.groupby("backbone", sort=True):
        chosen = best[str(backbone)]
        rows = rows.assign(depth=rows["layer"].map(layer_depth(rows["layer"])))
        transform = rows["transform"] == chosen.get("transform", "raw")
        at_time = rows[transform & (rows["timestep"] == chosen.get("timestep", 0))]
        at_layer = rows[transform & (rows["layer"] == chosen.get("layer", "-"))]
        by_layer.append(at_time.assign(series=f"{backbone} (t={chosen.get('timestep', 0)}, {chosen.get('transform', 'raw')})"))
        by_time.append(at_layer.assign(series=f"{backbone} ({chosen.get('layer', '-')}, {chosen.get('transform', 'raw')})"))
    keep = ["series", "backbone", "layer", "depth", "timestep", "transform", "pck"]
    return (pd.concat(by_layer)[keep].sort_values(["series", "depth"]).reset_index(drop=True),
            pd.concat(by_time)[keep].sort_values(["series", "timestep"]).reset_index(drop=True))


def pair_outcomes(paths, best: dict[str, dict]) -> pd.DataFrame:
    """Per pair: the keypoints correct and scored of each backbone's best variant in its setting (backbone,
    category, pair, correct, points), read from the predictions tables: the pairs behind each best PCK, for
    the bootstrap and the breakdowns by difficulty. Only the best variants' rows are read."""
    frames = []
    for path in paths:
        names = pq.read_schema(path).names
        filters = [[(column, "==", value) for column, value in
                    ({"backbone": backbone} | {k: v for k, v in variant.items() if k in ("layer", "timestep", "transform", "protocol")}).items()
                    if column in names] for backbone, variant in best.items()]
        try:
            frame = pq.read_table(path, filters=filters).to_pandas()
        except (OSError, ValueError) as exc:
            raise PipelineError(path, None, f"unreadable predictions table ({exc})") from None
        if "backbone" not in frame:
            frame["backbone"] = "all"
        for backbone, rows in frame.groupby("backbone", sort=True):
            variant = best[str(backbone)]
            scores = pair_scores(rows, alphas=(variant["alpha"],), thresholds=(variant["threshold_by"],))
            frames.append(scores.assign(backbone=str(backbone))[["backbone", "category", "pair", "correct", "points"]])
    if not frames:
        raise PipelineError(None, "predictions", "no rows of the best variants")
    return pd.concat(frames, ignore_index=True)


def by_flag(outcomes: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-image PCK of each backbone's best variant over the pairs of each value of SPair's difficulty flags
    (viewpoint and scale variation, truncation, occlusion): backbone, flag, value, pairs, pck."""
    flags = [f for f in FLAGS if f in pairs]
    merged = outcomes.merge(pairs[["filename", *flags]].rename(columns={"filename": "pair"}), on="pair", how="left")
    merged["score"] = merged["correct"] / merged["points"]
    long = merged.melt(id_vars=["backbone", "pair", "score"], value_vars=flags, var_name="flag", value_name="value")
    table = long.dropna(subset=["value"]).groupby(["backbone", "flag", "value"], sort=True)["score"]
    out = table.agg(pairs="size", pck="mean").reset_index()
    out["value"] = out["value"].astype(np.int64)
    return out
