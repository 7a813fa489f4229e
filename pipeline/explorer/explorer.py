"""What a click on a source point shows for every chosen store x layer x timestep x transform, from cache
only (no model is loaded). `Explorer` answers in plain data; pipeline/explorer/server.py serves it to the
page in `page/`.

Every number comes from the code that `match` and `evaluate` run: the query vector and the predicted
point from pipeline.matching.protocols (`dift`, with the target prepared once and kept), the cosine map
from `FeatureMap.cosine`, sharpness from `similarity_stats`, PCK from pipeline.evaluation.metrics; the
page only draws them. Maps are drawn as the study draws them (min-max normalised to 0-1, viridis).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from cachetools import LRUCache
from PIL import Image

from pipeline.cache import store
from pipeline.cache.current import check_current
from pipeline.errors import PipelineError, size_text
from pipeline.evaluation import metrics
from pipeline.evaluation.figures import VIRIDIS, normalised
from pipeline.matching.maps import StoreMaps, Variant
from pipeline.matching.match import pair_rows
from pipeline.matching.protocols import match_queries, prepare_target, similarity_stats, source_queries
from pipeline.matching.search import CellIndex, check_query
from pipeline.matching.transforms import check_configured

FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion", "mirror")
HISTOGRAM_BINS = 40
PREPARED_TARGETS = 32  # targets kept prepared (a few pairs' worth of variants)
MAX_MAPS = 32  # maps a click draws: a grid of 4 stores x 8 variants (timings: benchmarks/results/explore.json)
MAX_TOP = 100  # cells a dataset-wide search lists
INDEX_MEMORY_BYTES = 2 << 30  # search indexes kept in memory (the least recently used are dropped)


class Explorer:
    """Stores, the split and its predictions, answering the page's questions."""

    def __init__(self, stores: list[str | Path], pairs: pd.DataFrame, images: pd.DataFrame, root: str | Path,
                 transforms: dict[str, list[str]] | None = None, predictions: dict[str, str | Path] | None = None,
                 best: dict[str, dict] | None = None, params=None, allow_stale: bool = False,
                 source: str | Path = "params.yaml", compare: list[str] | None = None):
        """`stores` are known by their names (a store's `name` attribute: its backbone); `transforms`,
        `predictions` (predictions tables) and `best` (metrics/best) are keyed by those names; `compare` names the
        stores the page starts with (default: the first two).

        With `params` (pipeline.config.Params, read from `source`), a store params and the code would now
        build otherwise is refused in one line (pipeline/cache/current.py), or with `allow_stale` explored
        anyway: its warning is in `stale` (by store name) and in the catalogue. Without `params`, stores are
        explored as they are."""
        self.maps, self.stale = {}, {}
        for path in stores:
            warning = check_current(path, params, allow_stale, source) if params is not None else None
            maps = StoreMaps(path)
            if maps.name in self.maps:
                raise PipelineError(path, "name", f"two stores named {maps.name!r}; explore one of them at a time")
            self.maps[maps.name] = maps
            if warning:
                self.stale[maps.name] = warning
        self.pairs = pairs.set_index(pd.Index(pairs["filename"].to_numpy()))
        self.images = images.set_index("image")
        self.root = Path(root)
        self.transforms = {name: list((transforms or {}).get(name, ["raw"])) for name in self.maps}
        self.predictions = {name: Path(path) for name, path in (predictions or {}).items()
                            if name in self.maps and Path(path).exists()}
        self.best = best or {}
        self.compare = [name for name in (compare or []) if name in self.maps] or list(self.maps)[:2]
        # Bounded: a long session keeps the most recently used, whatever it clicks.
        self._prepared = LRUCache(PREPARED_TARGETS)
        self._pairs_done = LRUCache(4 * PREPARED_TARGETS)
        self._indexes = LRUCache(INDEX_MEMORY_BYTES, getsizeof=lambda index: index.nbytes)
        self._search_maps: dict[str, StoreMaps] = {}
        self._correct: dict = {}  # one table per store with predictions

    # ---- what there is -------------------------------------------------------------------------------
    def catalogue(self) -> dict:
        return {
            "stores": [{"name": name, "layers": maps.layers, "timesteps": maps.timesteps,
                        "transforms": self.transforms[name], "predictions": name in self.predictions,
                        "default": asdict(self.default_variant(name)), "stale": self.stale.get(name)}
                       for name, maps in self.maps.items()],
            "compare": self.compare,
            "limits": {"maps": MAX_MAPS, "top": MAX_TOP},
            "categories": sorted(self.pairs["category"].unique().tolist()),
            "flags": {flag: sorted(int(v) for v in self.pairs[flag].unique()) for flag in FLAGS if flag in self.pairs},
            "images": sorted(self.images.index.tolist()),
            "sizes": {key: [int(row.width), int(row.height)] for key, row in self.images.iterrows()},
            "pairs": len(self.pairs),
        }

    def default_variant(self, name: str) -> Variant:
        """A store's best variant in DIFT's setting (metrics/best), else its first layer, timestep and transform."""
        maps, best = self.maps[name], self.best.get(name, {})
        if (best.get("layer") in maps.layers and best.get("timestep") in maps.timesteps
                and best.get("transform", "raw") in self.transforms[name]):
            return Variant(name, best["layer"], int(best["timestep"]), best.get("transform", "raw"))
        return Variant(name, maps.layers[0], maps.timesteps[0], self.transforms[name][0])

    def pair_list(self, category: str | None = None, flag: str | None = None, value: int | None = None,
                  right: str | None = None, wrong: str | None = None, limit: int = 500) -> dict:
        """Pairs of the split, filtered (`total`, and the first `limit` as `pairs`); with `right` and `wrong`
        (two stores with predictions), the pairs with keypoints that `right`'s best variant gets right and
        `wrong`'s gets wrong, most first."""
        chosen = self.pairs
        if category:
            chosen = chosen[chosen["category"] == category]
        if flag:
            if flag not in FLAGS or flag not in chosen:
                raise PipelineError(None, "flag", f"unknown flag {flag!r}; expected one of {list(FLAGS)}")
            chosen = chosen[chosen[flag] == int(value if value is not None else 1)]
        counts = None
        if bool(right) != bool(wrong):
            raise PipelineError(None, "right" if wrong else "wrong", "choose both `right` and `wrong` stores, or neither")
        if right or wrong:
            counts = self.right_and_wrong(right, wrong)
            chosen = chosen[chosen.index.isin(counts.index)]
            chosen = chosen.assign(disagreements=counts.reindex(chosen.index).to_numpy())
            chosen = chosen.sort_values(["disagreements", "filename"], ascending=[False, True])
        rows = []
        for pair in chosen.head(limit).itertuples(index=False):
            row = {"pair": pair.filename, "category": pair.category, "src_image": pair.src_image,
                   "trg_image": pair.trg_image, "keypoints": len(pair.kps_ids),
                   **{flag: int(getattr(pair, flag)) for flag in FLAGS if hasattr(pair, flag)}}
            if counts is not None:
                row["disagreements"] = int(pair.disagreements)
            rows.append(row)
        return {"total": len(chosen), "pairs": rows}

    def right_and_wrong(self, right: str, wrong: str) -> pd.Series:
        """Per pair, how many keypoints `right` predicts correctly and `wrong` does not (PCK@0.1 in DIFT's
        setting, each store at its best variant), pairs with none left out."""
        both = [self._keypoints_correct(name) for name in (right, wrong)]
        merged = both[0].merge(both[1], on=["pair", "keypoint"], suffixes=("_right", "_wrong"))
        hits = merged[merged["correct_right"] & ~merged["correct_wrong"]]
        return hits.groupby("pair").size()

    def _keypoints_correct(self, name: str) -> pd.DataFrame:
        if name not in self.predictions:
            raise PipelineError(None, "compare", f"no predictions for store {name!r}; run `match` for it first "
                                                 f"(have: {sorted(self.predictions)})")
        if name not in self._correct:
            table = pd.read_parquet(self.predictions[name], filters=[("protocol", "==", "dift")])
            best = self.best.get(name)
            if best:
                table = table[(table["layer"] == best["layer"]) & (table["timestep"] == best["timestep"])
                              & (table["transform"] == best.get("transform", "raw"))]
            elif table.empty:
                raise PipelineError(self.predictions[name], "protocol", "no `dift` predictions to compare with")
            else:  # without metrics, the table's first variant
                first = table.iloc[0]
                table = table[(table["layer"] == first["layer"]) & (table["timestep"] == first["timestep"])
                              & (table["transform"] == first.get("transform", "raw"))]
            scores = metrics.pair_scores(table.assign(pair=table["pair"] + "\t" + table["keypoint"].astype(str)),
                                         alphas=(metrics.HEADLINE_ALPHA,))
            keys = scores["pair"].str.split("\t", n=1, expand=True)
            self._correct[name] = pd.DataFrame({"pair": keys[0], "keypoint": keys[1],
                                                "correct": scores["correct"].to_numpy() > 0})
        return self._correct[name]

    def pair(self, name: str) -> dict:
        row = self._pair_row(name)
        return {"pair": name, "category": row["category"], "keypoints": [str(k) for k in row["kps_ids"]],
                "src": self._side(row, "src"), "trg": self._side(row, "trg")}

    def _side(self, row: pd.Series, side: str) -> dict:
        return {"image": row[f"{side}_image"], "width": int(row[f"{side}_width"]), "height": int(row[f"{side}_height"]),
                "kps": [[int(v) for v in p] for p in row[f"{side}_kps"]]}

    def _pair_row(self, name: str) -> pd.Series:
        if name not in self.pairs.index:
            raise PipelineError(None, "pair", f"no pair named {name!r} in the split")
        return self.pairs.loc[name]

    def image_path(self, key: str) -> Path:
        if key not in self.images.index:
            raise PipelineError(None, "image", f"no image {key!r} in the split")
        return self.root / self.images.at[key, "path"]

    # ---- a click ---------------------------------------------------------------------------------------
    def click(self, variants: list[Variant], point, pair: str | None = None, src: str | None = None,
              trg: str | None = None, keypoint: int | None = None) -> dict:
        """For a source point (x, y), per variant: the target's cosine map (PNG, viridis over the min-max
        normalised map), the predicted point, the true point (for an annotated keypoint), the histogram of
        similarity values, sharpness figures, and the pair's PCK@0.1 (bbox and img, DIFT's `<=`)."""
        row = self._pair_row(pair) if pair else None
        src, trg = (row["src_image"], row["trg_image"]) if row is not None else (src, trg)
        for key in (src, trg):
            self.image_path(key)
        if keypoint is not None:
            if row is None or not 0 <= keypoint < len(row["src_kps"]):
                raise PipelineError(None, "keypoint", f"no keypoint {keypoint} in this pair")
            point = row["src_kps"][keypoint]
        width, height = (int(self.images.at[src, c]) for c in ("width", "height"))
        if not (0 <= point[0] < width and 0 <= point[1] < height):
            raise PipelineError(None, "point", f"({point[0]}, {point[1]}) is outside the source image, {size_text(width, height)}")
        point = np.array([[int(point[0]), int(point[1])]], np.int64)
        truth = ([int(v) for v in row["trg_kps"][keypoint]] if keypoint is not None else None)
        answers = []
        for variant in variants:
            maps = self._maps(variant)
            maps.check_images([src])
            target, prepared = self._target(variant, trg)
            known = self._pair_answer(row, variant) if row is not None else None
            query = source_queries(*maps.source(src, variant.layer, variant.timestep, variant.transform), point, "dift")
            if keypoint is not None:
                predicted = known["predicted"][keypoint]  # as `match` predicts it: with the pair's other keypoints
            else:
                predicted = match_queries(target, query, "dift", "none", prepared=prepared)[0][0]
            scores = target.cosine(query)
            stats = similarity_stats(scores, predicted[None])
            at = lambda p: float(scores[0, p[1], p[0]])  # noqa: E731
            counts, edges = np.histogram(scores, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
            answers.append({
                "variant": asdict(variant), "label": variant.label(), "map": _png(normalised(scores[0])),
                "predicted": [int(v) for v in predicted], "true": truth,
                "at_predicted": at(predicted), "at_true": at(truth) if truth else None,
                "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
                "sharpness": {k: float(v[0]) for k, v in stats.items()},
                **({"pck": known["pck"]} if known else {}),
            })
        return {"src": src, "trg": trg, "point": point[0].tolist(), "keypoint": keypoint, "maps": answers}

    def _pair_answer(self, row: pd.Series, variant: Variant) -> dict:
        """A pair's predicted keypoints under one variant (all in one batch, as `match` does) and its
        PCK@0.1 by bbox and by image side: once per pair and variant."""
        key = (row["filename"], variant)
        if key not in self._pairs_done:
            maps = self._maps(variant)
            maps.check_images([row["src_image"]])
            target, prepared = self._target(variant, row["trg_image"])
            points = np.array([list(p) for p in row["src_kps"]], dtype=np.int64)
            queries = source_queries(*maps.source(row["src_image"], variant.layer, variant.timestep, variant.transform),
                                     points, "dift")
            predicted, _ = match_queries(target, queries, "dift", "none", prepared=prepared)
            rows = pair_rows(row, points, predicted, {}, {"backbone": variant.store, "layer": variant.layer,
                                                          "timestep": variant.timestep, "protocol": "dift",
                                                          "transform": variant.transform})
            scores = metrics.pair_scores(rows, alphas=(metrics.HEADLINE_ALPHA,), thresholds=tuple(metrics.THRESHOLDS))
            self._pairs_done[key] = {"predicted": predicted,
                                     "pck": {r.threshold_by: r.correct / r.points for r in scores.itertuples()}}
        return self._pairs_done[key]

    def _maps(self, variant: Variant) -> StoreMaps:
        if variant.store not in self.maps:
            raise PipelineError(None, "store", f"no store named {variant.store!r}; have {sorted(self.maps)}")
        maps = self.maps[variant.store]
        if not store.is_url(maps.path) and not Path(maps.path).is_dir():
            raise PipelineError(maps.path, None, "store missing (moved or deleted while the explorer runs)")
        maps.check_variant(variant.layer, variant.timestep)
        check_configured(variant.transform, self.transforms[variant.store], variant.store)
        return maps

    def _target(self, variant: Variant, image: str):
        """A target map and its prepared `dift` search, kept for the next clicks."""
        key = (variant, image)
        if key not in self._prepared:
            maps = self._maps(variant)
            maps.check_images([image])
            target = maps.load(image, variant.layer, variant.timestep, variant.transform)
            self._prepared[key] = target, prepare_target(target, "dift")
        return self._prepared[key]

    def warm(self, variants: list[Variant], pair: str | None = None, trg: str | None = None) -> None:
        """Prepare a pair's target maps before its first click."""
        row = self._pair_row(pair) if pair else None
        for variant in variants:
            if row is None:
                self._target(variant, trg)
            else:
                self._pair_answer(row, variant)

    # ---- search ------------------------------------------------------------------------------------------
    def search(self, variant: Variant, image: str, point, top: int = 20) -> list[dict]:
        if not 1 <= top <= MAX_TOP:
            raise PipelineError(None, "top", f"expected 1 to {MAX_TOP} cells, got {top}")
        self._maps(variant)  # configured variants only: each builds an index on disk
        # Readers of its own: a search runs beside clicks (pipeline/explorer/server.py), sharing no cache.
        if variant.store not in self._search_maps:
            self._search_maps[variant.store] = StoreMaps(self.maps[variant.store].path)
        maps = self._search_maps[variant.store]
        check_query(maps, image, point, top)
        if variant not in self._indexes:
            index = CellIndex(maps, variant.layer, variant.timestep, variant.transform, quiet=True)
            try:
                self._indexes[variant] = index
            except ValueError:  # larger than the whole in-memory budget: used once, not kept
                return index.search(image, point, top).to_dict(orient="records")
        return self._indexes[variant].search(image, point, top).to_dict(orient="records")


def _png(values: np.ndarray) -> str:
    """(H, W) values in 0-1 as a data URL: an 8-bit PNG with viridis as its palette (a third of RGB's bytes),
    compression level 1 (a map is drawn once: encoding time matters more than bytes)."""
    levels = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    image = Image.frombytes("P", (levels.shape[1], levels.shape[0]), levels.tobytes())
    image.putpalette(VIRIDIS.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def load_best(folder: str | Path) -> dict[str, dict]:
    """metrics/best/<store>.json (the `evaluate` stage): each store's best variant in DIFT's setting."""
    folder = Path(folder)
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))} if folder.exists() else {}
