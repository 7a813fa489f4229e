"""reports/: the study's answer, one setting per number.

`index.md` is what a researcher reads first and quotes; `index.json` is its machine-readable twin (the
markdown tables are rendered from it). Every table names its setting: protocol, threshold family, PCK kind,
alpha, and which pairs; nothing is averaged or maximised across settings. The headline is DIFT's setting
(`metrics.HEADLINE`); the other settings get their own table, and published figures are set beside the
measured figure of the same setting (and, where the paper fixes them, the same layer and timestep).

Everything here comes from metrics/ (`findings.Findings`), the stores and the pairs: no model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.cache.store import FeatureStore
from pipeline.evaluation import figures, homography, metrics
from pipeline.evaluation.findings import Findings
from pipeline.matching.maps import Variant


@dataclass(frozen=True)
class Published:
    """A published SPair-71k test PCK@0.1 (bbox), in the setting its source measured it (DESIGN.md)."""

    method: str
    kind: str | None  # the backbone kind it compares with (None: nothing here is comparable)
    transform: str | None
    layer: str | None  # fixed by the paper, or None
    timestep: int | None
    pck: float  # x 100
    protocol: str
    measure: str  # per_image | per_point
    source: str


PUBLISHED = [
    Published("DIFT, SD2.1", "sd2", "raw", "up_blocks.1", 261, 52.9, "dift", "per_image", "DIFT paper (ensemble 8)"),
    Published("DIFT, SD2.1 (re-run)", "sd2", "raw", "up_blocks.1", 261, 59.6, "dift", "per_point", "CleanDIFT Tab. 4/5"),
    Published("OpenCLIP ViT-H/14", "clip", "raw", None, None, 38.4, "dift", "per_image", "DIFT's table"),
    Published("DINOv2-B/14", "dinov2", "raw", None, None, 53.9, "geoaware", "per_image", "Geometry Matters Tab. 1"),
    Published("DINOv2-B/14 (re-run)", "dinov2", "raw", None, None, 55.6, "dift", "per_point", "CleanDIFT"),
    Published("DiTF, FLUX raw", "flux", "raw", "single_transformer_blocks.9", None, 29.9, "dift", "per_image", "DiTF README"),
    Published("DiTF, FLUX AdaLN", "flux", "adaln", "single_transformer_blocks.9", None, 65.3, "dift", "per_image", "DiTF README"),
    Published("DiTF, FLUX AdaLN + channel discard", "flux", "drop:auto+adaln", "single_transformer_blocks.9", None, 67.1,
              "dift", "per_image", "DiTF README"),
    Published("DINO ViT-B/8", None, None, None, None, 33.9, "dift", "per_image", "DIFT's table"),
    Published("SD+DINO", None, None, None, None, 59.9, "geoaware", "per_image", "Geometry Matters"),
    Published("GeoAware-SC zero-shot", None, None, None, None, 65.4, "geoaware", "per_image", "GeoAware-SC"),
]
IDENTITY = ("layer", "timestep", "transform")  # what names a variant within a backbone


def _variant_label(row) -> str:
    return ", ".join(f"t={row[c]}" if c == "timestep" else str(row[c]) for c in IDENTITY if c in row and pd.notna(row[c]))


def _section(key: str, title: str, setting: dict, rows: pd.DataFrame | list[dict], note: str = "",
             decimals: int = 3, setting_text: str | None = None) -> dict:
    """One table of the report: its rows, and the one setting they are all in (a field set to None varies
    along the rows, which name it); `setting_text` for a setting that is not SPair's PCK."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    records = json.loads(frame.to_json(orient="records", double_precision=6))
    return {"key": key, "title": title, "setting": setting,
            "setting_text": setting_text or metrics.describe_setting(setting),
            "note": note, "columns": list(frame.columns), "rows": records, "decimals": decimals}


def build(findings: Findings, stores: dict[str, str]) -> dict:
    """The report's content: sections of rows, each in one named setting (what index.json holds)."""
    table, best, setting = findings.table, findings.best, findings.setting
    head = metrics.in_setting(table)
    sections = []

    rows = [{"backbone": name, **{c: b.get(c) for c in IDENTITY}, "pck": b["per_image"],
             "ci95_low": b.get("per_image_ci95", [None, None])[0], "ci95_high": b.get("per_image_ci95", [None, None])[1],
             "pairs": b["pairs"], "split_pairs": b["split_pairs"]} for name, b in sorted(best.items())]
    sections.append(_section("best", "Best variant per backbone", setting, rows,
                             f"95% interval: paired bootstrap over pairs ({findings.bootstrap['resamples']} resamples, "
                             f"seed {findings.bootstrap['seed']}); pairs: scored / of the split."))

    diffs = findings.differences.rename(columns={"low": "ci95_low", "high": "ci95_high"})
    sections.append(_section("differences", "Differences between the best variants", setting, diffs,
                             "Paired over the pairs both backbones scored (the same resamples as above); the better "
                             "backbone first. An interval that excludes 0 separates the two at 95%."))

    chosen = pd.DataFrame([{"backbone": n, **{c: b[c] for c in IDENTITY if c in b}} for n, b in best.items()])
    keys = [c for c in chosen.columns if c in table]
    alphas = metrics.in_setting(table, alpha=None).merge(chosen[keys], on=keys)
    by_alpha = alphas.pivot(index="backbone", columns="alpha", values="pck")
    by_alpha.columns = [f"PCK@{a:g}" for a in by_alpha.columns]
    sections.append(_section("by_alpha", "The best variants at every alpha", {**setting, "alpha": None},
                             by_alpha.reset_index()))

    rows = []
    for (protocol, threshold_by), _ in table.groupby(["protocol", "threshold_by"], sort=True):
        for kind in ("per_image", "per_point"):
            scored = metrics.in_setting(table, protocol=protocol, threshold_by=threshold_by, kind=kind)
            for backbone, group in scored.groupby("backbone", sort=True):
                top = group.loc[group["pck"].idxmax()]
                rows.append({"protocol": protocol, "threshold_by": threshold_by, "kind": kind, "backbone": backbone,
                             **{c: top[c] for c in IDENTITY if c in top}, "pck": top["pck"]})
    sections.append(_section("settings", "Every setting, side by side: the best variant within each",
                             {**setting, "protocol": None, "threshold_by": None, "kind": None}, rows,
                             "Each column is one setting; each cell the best variant in that setting, so a "
                             "backbone's cells may name different layers."))

    categories = metrics.in_setting(table, category=None).merge(chosen[keys], on=keys)
    by_category = categories.pivot(index="category", columns="backbone", values="pck")
    order = [c for c in by_category.index if c not in ("all", "mean")] + ["mean"]
    by_category = by_category.reindex(order).rename(index={"mean": "mean of categories"})
    sections.append(_section("by_category", "The best variants per category", {**setting, "category": None},
                             by_category.reset_index()))

    flags = findings.flags.pivot(index=["flag", "value"], columns="backbone", values="pck").reset_index()
    counts = findings.flags.groupby(["flag", "value"], sort=True)["pairs"].max().to_numpy()
    flags.insert(2, "pairs", counts)
    sections.append(_section("by_flag", "The best variants per difficulty flag (SPair's pair annotations)",
                             {**setting, "category": None}, flags, "Per image over the pairs with that flag value."))

    sections.append(_section("published", "Published figures beside the measured ones",
                             {**setting, "protocol": None, "kind": None}, published_rows(table, best, stores),
                             "PCK x 100, each row in its source's setting (protocol, kind; alpha 0.1 x the target box). "
                             "`same variant`: the layer and timestep the paper fixes (its ensemble and canvas may "
                             "differ from this study's); `best in setting`: the best variant here in that setting. "
                             "Only comparable on the real study (real checkpoints on SPair-71k); the demo's models "
                             "are tiny and random.", decimals=1))

    every = head[["backbone", *[c for c in IDENTITY if c in head], "pck", "pairs"]]
    sections.append(_section("variants", "Every variant", setting, every.reset_index(drop=True)))
    return {"headline": setting, "headline_text": metrics.describe_setting(setting),
            "bootstrap": findings.bootstrap, "sections": sections}


def published_rows(table: pd.DataFrame, best: dict[str, dict], stores: dict[str, str]) -> list[dict]:
    """Each published figure beside, in its setting, the measured variant it names (where the paper fixes the
    layer and timestep) and the best measured variant of a backbone of the same kind."""
    kinds = {name: FeatureStore.open(path).attrs.get("backbone") for name, path in stores.items()}
    rows = []
    for paper in PUBLISHED:
        row = {"published": paper.method, "source": paper.source, "protocol": paper.protocol, "kind": paper.measure,
               "published PCK@0.1": paper.pck, "same variant": None, "same variant PCK@0.1": None,
               "best in setting": None, "best in setting PCK@0.1": None}
        names = [name for name, kind in kinds.items() if kind == paper.kind]
        has_setting = (table["protocol"] == paper.protocol).any() if "protocol" in table else paper.protocol == "dift"
        if names and has_setting:
            scored = metrics.in_setting(table, protocol=paper.protocol, kind=paper.measure)
            scored = scored[scored["backbone"].isin(names)]
            if paper.transform is not None and "transform" in scored:
                scored = scored[scored["transform"] == paper.transform]
            if len(scored):
                top = scored.loc[scored["pck"].idxmax()]
                row["best in setting"] = f"{top['backbone']}: {_variant_label(top)}"
                row["best in setting PCK@0.1"] = round(100 * float(top["pck"]), 1)
            same = scored
            for column, value in (("layer", paper.layer), ("timestep", paper.timestep)):
                if value is not None:
                    same = same[same[column] == value]
            if paper.layer is not None and len(same):
                top = same.loc[same["pck"].idxmax()]
                row["same variant"] = f"{top['backbone']}: {_variant_label(top)}"
                row["same variant PCK@0.1"] = round(100 * float(top["pck"]), 1)
        rows.append(row)
    return rows


def _markdown(section: dict) -> str:
    frame = pd.DataFrame(section["rows"], columns=section["columns"])
    if section["key"] == "settings":  # one column per setting: "<pck> (<variant>)"
        frame["cell"] = [f"{r['pck']:.{section['decimals']}f} ({_variant_label(r)})" for _, r in frame.iterrows()]
        frame["setting"] = frame["protocol"] + ", " + frame["threshold_by"] + ", " + frame["kind"].str.replace("_", " ")
        frame = frame.pivot(index="backbone", columns="setting", values="cell").reset_index()
        frame.columns.name = None
    if frame.empty:
        body = "(none)"
    else:
        shown = frame.astype(object).where(frame.notna(), "-")
        for column in frame.columns:
            if pd.api.types.is_float_dtype(frame[column]):
                shown[column] = [f"{v:.{section['decimals']}f}" if isinstance(v, float) else v for v in shown[column]]
        body = shown.to_markdown(index=False, disable_numparse=True)
    lines = [f"## {section['title']}", "", f"*Setting: {section['setting_text']}.*"]
    if section["note"]:
        lines += ["", section["note"]]
    return "\n".join(lines + ["", body, ""])


def figure_variants(findings: Findings, stores: dict[str, str], shown: dict[str, list[str]]) -> list[Variant]:
    """Each backbone's best variant, then the layers `shown` beside it (at its best timestep and transform)."""
    variants = []
    for backbone, best in sorted(findings.best.items()):
        if backbone not in stores:
            continue
        for layer in [best["layer"]] + [l for l in shown.get(backbone, []) if l != best["layer"]]:
            variants.append(Variant(stores[backbone], layer, int(best["timestep"]), best.get("transform", "raw")))
    return variants


def hpatches_sections(accuracy: pd.DataFrame) -> list[dict]:
    """HPatches homography estimation (pipeline/evaluation/homography.py's accuracy table): each backbone's best
    variant at every threshold and subset, and every variant overall."""
    setting = homography.setting(accuracy)
    text = homography.describe_setting(setting)
    best = homography.best_variants(accuracy)
    rows = [{"backbone": name, **{c: b[c] for c in homography.IDENTITY}, **b["accuracy"], "pairs": b["pairs"]}
            for name, b in sorted(best.items())]
    note = (f"Accuracy (%) = share of pairs whose mean corner error is <= the threshold, in pixels of image 1; "
            f"`i`: illumination sequences, `v`: viewpoint, `all`: every pair (DIFT's overall). Best variant: the "
            f"highest mean of the `all` columns, chosen on these pairs.")
    every = homography.wide(accuracy, subsets=("all",))
    return [_section("hpatches", "Geometric correspondence: HPatches homography estimation", setting, rows, note, 1,
                     text),
            _section("hpatches_variants", "HPatches: every variant", setting, every,
                     "Accuracy (%) over all pairs at each threshold.", 1, text)]


def davis_sections(scores: pd.DataFrame, best: dict) -> list[dict]:
    """DAVIS-2017 label propagation (pipeline/evaluation/video_segmentation.py): each backbone's best variant
    and the protocol as metrics/davis/jf.json has them, and every variant (jf.csv)."""
    protocol = best["protocol"]
    rows = [{"backbone": name, **b} for name, b in sorted(best.items()) if name != "protocol"]
    note = ("J: region IoU, F: boundary F-measure, each averaged over frames per object, then over objects; J&F their "
            "mean; recall: share of frames above 0.5; decay: first quarter minus last. Best variant: the highest J&F, "
            "chosen on these videos. DIFT's published DAVIS figures (arXiv 2306.03881) are not shown: their table "
            "could not be read where this was built.")
    return [_section("davis", "Temporal correspondence: DAVIS-2017 label propagation", {}, rows, note, 3, protocol),
            _section("davis_variants", "DAVIS: every variant", {}, scores, "J&F, J and F of every stored variant.", 3,
                     protocol)]


def write_report(out_dir: str | Path, findings: Findings, stores: dict[str, str], pairs: pd.DataFrame,
                 images: pd.DataFrame, root: str | Path, shown: dict[str, list[str]] | None = None,
                 hpatches: pd.DataFrame | None = None, davis: tuple[pd.DataFrame, dict] | None = None) -> Path:
    """reports/index.md and its twin index.json, with the figures they show; `hpatches`: the HPatches accuracy
    table (metrics/hpatches/accuracy.csv), `davis`: the DAVIS variant table and best variants
    (metrics/davis/jf.csv, jf.json), when the study has them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    content = build(findings, stores)
    if hpatches is not None and len(hpatches):
        content["sections"] += hpatches_sections(hpatches)
    if davis is not None and len(davis[0]):
        content["sections"] += davis_sections(*davis)
    setting_text = content["headline_text"]
    by_depth, by_timestep = metrics.curve_tables(findings.table)
    figures.curve_figure(by_depth, "depth", out_dir / "pck_vs_depth.png", "relative layer depth",
                         f"PCK against relative layer depth\n{setting_text}; each backbone at its best timestep and transform")
    figures.curve_figure(by_timestep, "timestep", out_dir / "pck_vs_timestep.png", "timestep (0..1000)",
                         f"PCK against timestep\n{setting_text}; each backbone at its best layer and transform")
    variants = figure_variants(findings, stores, shown or {})
    figures.heatmaps(variants, pairs, images, root, out_dir / "heatmaps.png")
    figures.similarity_histograms(variants, pairs, out_dir / "similarity_histograms.png")
    resources = figures.resource_table(list(stores.values()))

    sections = {s["key"]: _markdown(s) for s in content["sections"]}
    text = "\n".join([
        "# dift-cache report", "",
        f"Headline setting: **{setting_text}** (DIFT's). Every number below names its setting; none is "
        "averaged or maximised across settings. Computed from cached stores and predictions; no model was loaded.", "",
        "## SD2 vs SD3 (and the rest) at a glance", "",
        "![PCK against relative layer depth, one line per backbone](pck_vs_depth.png)", "",
        sections["best"], sections["differences"],
        "## PCK against timestep", "", "![PCK against timestep, one line per backbone](pck_vs_timestep.png)", "",
        sections["by_alpha"], sections["settings"], sections["by_category"], sections["by_flag"],
        sections["published"],
        *([sections["hpatches"], sections["hpatches_variants"]] if "hpatches" in sections else []),
        *([sections["davis"], sections["davis_variants"]] if "davis" in sections else []),
        "## Similarity heatmaps", "",
        "Each backbone's best variant (and the layers `report.shown` names). Source with the query point; each "
        "target under its cosine map (0-1, viridis); white circle: true point, red cross: prediction.", "",
        "![heatmaps](heatmaps.png)", "",
        "## Distribution of similarity values", "", "![histograms](similarity_histograms.png)", "",
        sections["variants"],
        "## Resources", "", resources.to_markdown(index=False), "",
    ])
    (out_dir / "index.md").write_text(text)
    (out_dir / "index.json").write_text(json.dumps(content, indent=1) + "\n")
    return out_dir / "index.md"
