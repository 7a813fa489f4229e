"""The study's figures and report, from stores and predictions only (no model is loaded).

- heatmaps: the source image with the query keypoint, then the target image under the cosine map
  (normalised to 0-1, viridis, colour bar) with the true (white circle) and predicted (red cross)
  points, one panel per backbone / layer;
- similarity histograms: the distribution of cosine values over target pixels, per backbone;
- a resource table per backbone: seconds per image, peak memory, store size;
- `reports/index.md` tying PCK tables, curves and figures together.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.cache import store  # noqa: E402
from pipeline.data.images import read_rgb  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.cache.maps import StoreMaps, Variant  # noqa: E402
from pipeline.evaluation.metrics import HEADLINE_ALPHA, at_headline, best_variants  # noqa: E402


def _image(root: Path, images: pd.DataFrame, key: str) -> np.ndarray:
    return read_rgb(root / images.set_index("image").at[key, "path"])


def _pair(pairs: pd.DataFrame, name: str | None) -> pd.Series:
    if name is None:
        # The first cross-instance pair (not an identity pair) is the more telling default.
        cross = pairs[pairs["src_image"] != pairs["trg_image"]]
        return (cross if len(cross) else pairs).iloc[0]
    found = pairs[pairs["filename"] == name]
    if found.empty:
        raise PipelineError(None, "pair", f"no pair named {name!r} in the pairs table")
    return found.iloc[0]


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def normalised(scores: np.ndarray) -> np.ndarray:
    """A cosine map min-max normalised to 0-1, as the study's heatmaps show it."""
    return (scores - scores.min()) / max(float(scores.max() - scores.min()), 1e-12)


VIRIDIS = (plt.get_cmap("viridis")(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3) RGB


def similarity_map(maps: StoreMaps, variant: Variant, pair: pd.Series, keypoint: int) -> np.ndarray:
    source = maps.load(pair["src_image"], variant.layer, variant.timestep, variant.transform)
    target = maps.load(pair["trg_image"], variant.layer, variant.timestep, variant.transform)
    point = np.array([list(pair["src_kps"][keypoint])])
    return target.cosine(source.vectors_at(point))[0]


def heatmaps(variants: list[Variant], pairs: pd.DataFrame, images: pd.DataFrame, root: str | Path,
             out: str | Path, pair_name: str | None = None, keypoint: int = 0) -> Path:
    """Source with the query point, then one target heatmap per variant (the study's Figures 2-4)."""
    pair = _pair(pairs, pair_name)
    if not 0 <= keypoint < len(pair["kps_ids"]):
        raise PipelineError(None, "keypoint", f"pair {pair['filename']} has keypoints 0..{len(pair['kps_ids']) - 1}")
    root = Path(root)
    source_image, target_image = _image(root, images, pair["src_image"]), _image(root, images, pair["trg_image"])
    sx, sy = pair["src_kps"][keypoint]
    tx, ty = pair["trg_kps"][keypoint]
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(3.2 * (len(variants) + 1), 3.4), squeeze=False)
    axes = axes[0]
    axes[0].imshow(source_image)
    axes[0].scatter([sx], [sy], s=80, c="red", marker="o", edgecolors="white", linewidths=1.5)
    axes[0].set_title(f"source: {pair['src_image']}\nkeypoint {pair['kps_ids'][keypoint]}", fontsize=8)
    stores: dict[str, StoreMaps] = {}
    for ax, variant in zip(axes[1:], variants):
        maps = stores.setdefault(variant.store, StoreMaps(variant.store))
        scores = similarity_map(maps, variant, pair, keypoint)
        y, x = np.unravel_index(scores.argmax(), scores.shape)
        ax.imshow(target_image)
        shown = ax.imshow(normalised(scores), cmap="viridis", alpha=0.6, vmin=0, vmax=1)
        ax.scatter([tx], [ty], s=80, facecolors="none", edgecolors="white", linewidths=2, label="true")
        ax.scatter([x], [y], s=80, c="red", marker="x", linewidths=2, label="predicted")
        ax.set_title(variant.label(maps.name), fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    axes[-1].legend(loc="lower right", fontsize=6)
    fig.suptitle(f"{pair['filename']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def similarity_histograms(variants: list[Variant], pairs: pd.DataFrame, out: str | Path, max_pairs: int = 8) -> Path:
    """Distribution of cosine values over target pixels per backbone (the study's Figure 5)."""
    chosen = pairs[pairs["src_image"] != pairs["trg_image"]].head(max_pairs)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant in variants:
        maps = StoreMaps(variant.store)
        values = [similarity_map(maps, variant, pair, k).ravel()[::7]
                  for _, pair in chosen.iterrows() for k in range(min(3, len(pair["kps_ids"])))]
        ax.hist(np.concatenate(values), bins=60, range=(-1, 1), histtype="step", density=True,
                label=variant.label(maps.name), linewidth=1.5)
    ax.set_xlabel("cosine similarity to the source keypoint, over target pixels")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def resource_table(store_paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in store_paths:
        root = store.open_existing(path)
        images = store.read_images(root)
        done = images[images["done"]]
        rows.append({"backbone": root.attrs.get("name"), "model": root.attrs.get("model"),
                     "device": root.attrs.get("device"), "images": f"{len(done)}/{len(images)}",
                     "seconds/image (median)": round(float(done["seconds"].median()), 4) if len(done) else None,
                     "peak memory (MiB)": round(float(done["peak_memory"].max()) / 2**20) if len(done) else None,
                     "store (MiB)": round(store.size_on_disk(path) / 2**20, 2)})
    return pd.DataFrame(rows)


def curve_figure(curve: pd.DataFrame, x: str, out: str | Path, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for series, rows in curve.groupby("series", sort=True):
        ax.plot(rows[x], rows["pck"], marker="o", label=series)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"PCK@{HEADLINE_ALPHA:g} (per image)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, out)


# Published SPair-71k test PCK@0.1 (bbox) from DESIGN.md: (method, backbone kind, transform, PCK x 100, kind).
PUBLISHED = [
    ("DIFT, SD2.1 up_blocks.1 t=261", "sd2", "raw", 52.9, "per_image"),
    ("DIFT, SD2.1 (re-runs)", "sd2", "raw", 59.6, "per_point"),
    ("OpenCLIP ViT-H/14", "clip", "raw", 38.4, "per_image"),
    ("DINOv2-B/14", "dinov2", "raw", 55.6, "per_point"),
    ("DiTF, FLUX raw", "flux", "raw", 29.9, "per_image"),
    ("DiTF, FLUX AdaLN", "flux", "adaln", 65.3, "per_image"),
    ("DiTF, FLUX AdaLN + channel discard", "flux", "drop:auto+adaln", 67.1, "per_image"),
    ("DINO ViT-B/8", None, None, 33.9, "per_image"),
    ("SD+DINO fusion", None, None, 64.0, "per_point"),
]


def published_table(table: pd.DataFrame, stores: dict[str, str]) -> pd.DataFrame:
    """The published figures beside the best measured PCK@0.1 of each backbone of the same kind."""
    kinds = {name: store.open_existing(path).attrs.get("backbone") for name, path in stores.items()}
    head = at_headline(table)
    rows = []
    for method, kind, transform, value, measure in PUBLISHED:
        names = [name for name, k in kinds.items() if k == kind]
        chosen = head[head["backbone"].isin(names) & (head["kind"] == measure)]
        if "transform" in chosen:
            chosen = chosen[chosen["transform"] == transform]
        measured = f"{100 * chosen['pck'].max():.1f} ({', '.join(names)})" if len(chosen) else "-"
        rows.append({"published": method, "PCK@0.1": value, "kind": measure.replace("_", " "), "measured here": measured})
    return pd.DataFrame(rows)


def best_variants_of(table: pd.DataFrame, stores: dict[str, str]) -> dict[str, Variant]:
    """Per backbone, the layer and timestep with the best per-image PCK@0.1."""
    return {backbone: Variant(stores[backbone], best["layer"], int(best["timestep"]), best.get("transform", "raw"))
            for backbone, best in sorted(best_variants(table).items()) if backbone in stores}


def write_report(out_dir: str | Path, table: pd.DataFrame, curves: tuple[pd.DataFrame, pd.DataFrame],
                 stores: dict[str, str], pairs: pd.DataFrame, images: pd.DataFrame, root: str | Path) -> Path:
    """reports/: PCK tables, curves, heatmaps, histograms, resources, tied together in index.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_variants_of(table, stores)
    variants = list(best.values())
    curve_figure(curves[0], "depth", out_dir / "pck_vs_layer.png", "relative layer depth")
    curve_figure(curves[1], "timestep", out_dir / "pck_vs_timestep.png", "timestep (0..1000)")
    heatmaps(variants, pairs, images, root, out_dir / "heatmaps.png")
    similarity_histograms(variants, pairs, out_dir / "similarity_histograms.png")
    resources = resource_table(list(stores.values()))

    head = at_headline(table, categories=("all", "mean"))
    index = [c for c in ("backbone", "layer", "timestep", "transform") if c in head]
    wide = head.pivot_table(index=index, columns=["kind", "category"], values="pck")
    wide.columns = [f"{kind} ({'mean of categories' if cat == 'mean' else 'all pairs'})" for kind, cat in wide.columns]
    chosen = pd.DataFrame([{"backbone": b, "layer": v.layer, "timestep": v.timestep, "transform": v.transform}
                           for b, v in best.items()])
    alphas = table[(table["kind"] == "per_image") & (table["category"] == "all")]
    alphas = alphas.merge(chosen if "transform" in alphas else chosen.drop(columns="transform"))
    by_alpha = alphas.pivot_table(index=[c for c in chosen.columns if c in alphas], columns="alpha", values="pck")
    by_alpha.columns = [f"PCK@{a:g}" for a in by_alpha.columns]
    per_image = head[(head["kind"] == "per_image") & (head["category"] == "all")]
    by_transform = per_image.pivot_table(index="backbone", columns="transform", values="pck", aggfunc="max") \
        if "transform" in per_image else per_image.groupby("backbone")["pck"].max().to_frame("raw")
    text = "\n".join([
        "# dift-cache report", "",
        "Everything here is computed from cached stores and predictions; no model was loaded.", "",
        "## Best layer per backbone (per image, all pairs)", "", by_alpha.round(3).reset_index().to_markdown(index=False), "",
        f"## PCK@{HEADLINE_ALPHA:g} by backbone x transform (per image, best layer and timestep)", "",
        by_transform.round(3).astype(object).where(by_transform.notna(), "-").reset_index().to_markdown(index=False), "",
        f"## PCK@{HEADLINE_ALPHA:g} by backbone, layer and timestep", "", wide.round(3).reset_index().to_markdown(index=False), "",
        "## Published figures (SPair-71k test) beside the measured ones", "",
        "The measured column is only comparable when this report comes from the real study (real checkpoints "
        "on SPair-71k); on the demo, the models are tiny and random.", "",
        published_table(table, stores).to_markdown(index=False), "",
        "## PCK vs layer and vs timestep", "", "![PCK vs layer](pck_vs_layer.png)", "",
        "![PCK vs timestep](pck_vs_timestep.png)", "",
        "## Similarity heatmaps (best layer per backbone)", "",
        "Source with the query point; each target under its cosine map (0-1, viridis); white circle: true "
        "point, red cross: prediction.", "", "![heatmaps](heatmaps.png)", "",
        "## Distribution of similarity values", "", "![histograms](similarity_histograms.png)", "",
        "## Resources", "", resources.to_markdown(index=False), "",
    ])
    (out_dir / "index.md").write_text(text)
    return out_dir / "index.md"
