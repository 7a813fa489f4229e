"""The study's figures and report, from stores and predictions only (no model is loaded).

- heatmaps: the source image with the query keypoint, then the target image under the cosine map
  (normalised to 0-1, viridis, colour bar) with the true (white circle) and predicted (red cross)
  points, one panel per backbone / layer;
- similarity histograms: the distribution of cosine values over target pixels, per backbone;
- a resource table per backbone: seconds per image, peak memory, store size;
- curves of PCK against layer depth and timestep, one line per backbone, the legend outside.
`pipeline/evaluation/report.py` ties them into reports/index.md.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.cache.store import FeatureStore
from pipeline.data.images import read_rgb
from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import HEADLINE_ALPHA
from pipeline.matching.maps import StoreMaps, Variant


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


def _save(fig: Figure, out: str | Path) -> Path:
    """Write a figure (files only: a Figure of its own, no pyplot, no backend; savefig draws it with Agg)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def normalised(scores: np.ndarray) -> np.ndarray:
    """A cosine map min-max normalised to 0-1, as the study's heatmaps show it."""
    return (scores - scores.min()) / max(float(scores.max() - scores.min()), 1e-12)


HEATMAP_COLUMNS = 5  # panels per row
VIRIDIS = (matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3) RGB


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
    panels = len(variants) + 1
    columns = min(panels, HEATMAP_COLUMNS)
    rows = -(-panels // columns)
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel()[panels:]:
        ax.remove()
    axes = axes.ravel()[:panels]
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
        ax.set_title(textwrap.fill(variant.label(maps.name), 40), fontsize=8)
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
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
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
        found = FeatureStore.open(path)
        attrs, images = found.attrs, found.images()
        done = images[images["done"]]
        rows.append({"backbone": attrs.get("name"), "model": attrs.get("model"),
                     "device": attrs.get("device"), "images": f"{len(done)}/{len(images)}",
                     "seconds/image (median)": round(float(done["seconds"].median()), 4) if len(done) else None,
                     "peak memory (MiB)": round(float(done["peak_memory"].max()) / 2**20) if len(done) else None,
                     "store (MiB)": round(found.size_on_disk() / 2**20, 2)})
    return pd.DataFrame(rows)


def curve_figure(curve: pd.DataFrame, x: str, out: str | Path, xlabel: str, title: str) -> Path:
    """One line per series (a backbone, with what is held fixed along it), the legend outside the axes; a
    series of one point (a VAE's latent, a ViT at t=0 on the timestep axis) is a dashed level across."""
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    colours = iter(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for series, rows in curve.groupby("series", sort=True):
        if len(rows) == 1:
            ax.axhline(float(rows["pck"].iloc[0]), linestyle="--", linewidth=1.2, color=next(colours), label=series)
        else:
            ax.plot(rows[x], rows["pck"], marker="o", color=next(colours), label=series)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"PCK@{HEADLINE_ALPHA:g}")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=8, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, out)
