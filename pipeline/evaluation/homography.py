"""HPatches homography accuracy as DIFT reports it (Tsingularity/dift @ 9421eb2, eval_homography.py): a pair
is correct at threshold t when its mean corner error <= t (pixels of image 1), thresholds
np.linspace(1, 5, 3) = 1, 3, 5; accuracy is the share of correct pairs x 100 over the illumination (`i`,
sequence name starting with "i") and viewpoint (`v`, "v") pairs and over all of them (DIFT's "overall", the
i and v pairs together). A failed estimate has error inf (see pipeline.matching.homography): it counts,
as a miss, in every denominator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

THRESHOLDS = (1, 3, 5)
SUBSETS = ("i", "v", "all")


def accuracy(pairs: pd.DataFrame, by: list[str], thresholds=THRESHOLDS) -> pd.DataFrame:
    """Long table `by + [subset, threshold, accuracy, pairs]`, one row per group, subset (i, v, all) and
    threshold; accuracy in percent, NaN where a subset has no pairs (pairs 0)."""
    missing = [c for c in ("sequence", "corner_error", *by) if c not in pairs.columns]
    if missing:
        raise PipelineError(None, "pairs", f"missing column(s) {missing}")
    kind = pairs["sequence"].astype(str).str[0]
    strays = sorted(set(pairs.loc[~kind.isin(["i", "v"]), "sequence"].astype(str)))
    if strays:  # DIFT's overall counts only i and v pairs: refuse rather than count others silently
        raise PipelineError(None, "sequence", f"not an HPatches sequence (i_* or v_*): {strays[:3]}")
    rows = []
    pairs = pairs.assign(_kind=kind.to_numpy())
    groups = pairs.groupby(list(by), sort=True, dropna=False) if by else [((), pairs)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        errors = group["corner_error"].to_numpy(np.float64)
        first = group["_kind"].to_numpy()
        for subset in SUBSETS:
            chosen = errors if subset == "all" else errors[first == subset]
            for t in thresholds:
                share = 100.0 * np.mean(chosen <= t) if len(chosen) else np.nan
                rows.append((*key, subset, t, share, len(chosen)))
    return pd.DataFrame(rows, columns=[*by, "subset", "threshold", "accuracy", "pairs"])


IDENTITY = ("layer", "timestep", "transform")  # what names a variant within a backbone
PROTOCOL = ("keypoints", "canvas", "metric", "method", "ransac_threshold")  # the same for every row of one study
VARIANT = ["backbone", *IDENTITY, *PROTOCOL]


def column(subset: str, threshold) -> str:
    return f"{subset} <= {threshold:g} px"


def setting(table: pd.DataFrame) -> dict:
    """The one protocol a table was measured in; two in one table is an error (never averaged across)."""
    found = table[list(PROTOCOL)].drop_duplicates()
    if len(found) != 1:
        raise PipelineError(None, "hpatches", f"pair tables of {len(found)} protocols {found.to_dict('records')}; "
                                              "match every backbone with the same datasets.hpatches settings")
    return found.iloc[0].to_dict()


def describe_setting(setting: dict) -> str:
    """A protocol in words, e.g. `DIFT's HPatches protocol: sift:1000 keypoints, images squashed to 768 px, mutual
    nearest neighbours on cosine similarity, cv2.findHomography lmeds; accuracy = % of pairs with mean corner
    error <= t px`."""
    method = setting["method"] + (f" ({setting['ransac_threshold']:g} px)" if setting["method"] == "ransac" else "")
    return (f"DIFT's HPatches protocol: {setting['keypoints']} keypoints, images squashed to {setting['canvas']} px, "
            f"mutual nearest neighbours on "
            f"{setting['metric']} {'similarity' if setting['metric'] == 'cosine' else 'distance'}, "
            f"cv2.findHomography {method}; accuracy = % of pairs with mean corner error <= t px")


def wide(table: pd.DataFrame, subsets=SUBSETS) -> pd.DataFrame:
    """One row per variant, a column per subset and threshold (`all <= 3 px`), and the pairs counted."""
    chosen = table[table["subset"].isin(subsets)]
    frame = chosen.assign(column=[column(s, t) for s, t in zip(chosen["subset"], chosen["threshold"])])
    keys = ["backbone", *IDENTITY]
    out = frame.pivot_table(index=keys, columns="column", values="accuracy", sort=False).reset_index()
    order = [column(s, t) for s in subsets for t in sorted(table["threshold"].unique())]
    pairs = chosen[chosen["subset"] == "all"].groupby(keys, sort=False)["pairs"].max() if "all" in subsets else None
    out = out.reindex(columns=keys + order)  # a subset without pairs (no v_ sequence) stays, as NaN
    if pairs is not None:
        out = out.merge(pairs.reset_index(), on=keys)
    out.columns.name = None
    return out


def best_variants(table: pd.DataFrame) -> dict[str, dict]:
    """Per backbone, its variant with the highest mean accuracy over the `all` thresholds (chosen on these
    pairs: the best a backbone's stored variants reach, not a held-out estimate)."""
    every = wide(table)
    overall = [c for c in every.columns if c.startswith("all <=")]
    every = every.assign(score=every[overall].mean(axis=1))
    best = {}
    for backbone, group in every.groupby("backbone", sort=True):
        top = group.loc[group["score"].idxmax()]
        best[backbone] = {"layer": top["layer"], "timestep": int(top["timestep"]), "transform": top["transform"],
                          "accuracy": {c: None if pd.isna(top[c]) else round(float(top[c]), 4)
                                       for c in every.columns if " <= " in c},
                          "pairs": int(top["pairs"])}
    return best


def write_metrics(paths, folder: str | Path) -> str:
    """metrics/hpatches/: accuracy.csv (every variant, subset and threshold), accuracy.json (each backbone's
    best variant with its protocol, what `dvc metrics show` reads) and plot.csv (the best variants' overall
    accuracy against the threshold); returns the best variants as text."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise PipelineError(missing[0], None, "no pair table: run its hpatches-match stage first")
    pairs = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    table = accuracy(pairs, VARIANT)
    protocol = setting(table)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "accuracy.csv", index=False, float_format="%.4f")
    best = best_variants(table)
    (folder / "accuracy.json").write_text(json.dumps({"protocol": describe_setting(protocol), **best}, indent=2) + "\n")
    rows = []
    for backbone, b in best.items():
        label = f"{backbone} ({b['layer']}, t={b['timestep']}" + ("" if b["transform"] == "raw" else f", {b['transform']}") + ")"
        for t in sorted(table["threshold"].unique()):
            rows.append({"series": label, "backbone": backbone, "threshold": t, "accuracy": b["accuracy"][column("all", t)]})
    pd.DataFrame(rows).to_csv(folder / "plot.csv", index=False, float_format="%.4f")
    lines = [describe_setting(protocol)]
    for backbone, b in best.items():
        cells = ", ".join(f"{k} {v:.1f}" for k, v in b["accuracy"].items() if k.startswith("all"))
        lines.append(f"  {backbone} ({b['layer']}, t={b['timestep']}, {b['transform']}): {cells}")
    return "\n".join(lines)
