"""A store kept with lossy `storage` measures what the encoding costs matching, and records it.

Extraction (`extract_measured`) first writes the images of a sample of the split's pairs (of images that did
not fit a `pca:K` store's axes, unless no such pair is left: `images_in_fit` says how many did), extracts
them again as float16 (the same seeded computation: the values the lossy store encoded) into
`<store>.fidelity-reference`, matches both stores on those pairs with the `dift` protocol under every
transform configured for the backbone, and records per layer in the store's attrs (`fidelity`): the fraction
of predictions identical to float16's, and the largest change of PCK@0.1 (bbox, in points) over the layer's
timesteps and transforms. For scale, the same two figures are recorded for the reference's own features
rounded to bfloat16 (`bfloat16_identical`, `bfloat16_pck_change`): how far predictions move with no encoding
at all, from the last rounding of a model computed in bfloat16 (FLUX in the real profile), read through
`Bfloat16Maps` (rounded in memory: the reference on disk is written once, never rewritten). On near-flat maps
(random weights) even that moves a few percent of predictions by a pixel. The reference is then deleted.

The whole of it runs under the store's one writer lock, and each step can be killed and run again: the
sample and the reference resume as any extraction does, matching is in memory, and the figures are one
attribute written last (then the reference, no longer needed, is deleted, or on a later run if a kill came
first).
Only then, if every layer meets `fidelity.min_identical` and `fidelity.max_pck_change` (params.yaml), are
the other images extracted. The figures record their `sample` and `transforms`, and are measured again
only when those change. `cli.py info` prints the figures (pipeline/cache/describe.py); `cli.py verify`
holds a store to the thresholds (pipeline/cache/verify.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.cache import store
from pipeline.cache.extract import extract, fit_sample
from pipeline.cache.store import FeatureStore
from pipeline.cache.verify import fidelity_problems
from pipeline.config import is_lossy, parse_storage
from pipeline.errors import PipelineError
from pipeline.evaluation import metrics
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import match_store


def extract_measured(params, name: str, out, replace: str = "never", client=None, on_error: str = "fail",
                     check_disk: bool = True) -> dict | None:
    """What `extract` (stage and CLI) runs: the backbone's whole store. A lossy one first extracts the images
    of its fidelity sample (after a `pca:K` store's fit) and measures them against float16, then stops with a
    one-line error, before the other images, when a layer is below `fidelity`'s thresholds (params.yaml): a
    store is days of GPU time. Its figures are kept, and measured again only for another sample or other
    transforms; the store resumes either way. Returns the figures of a lossy store, else None."""
    backbone = params.backbone(name)
    latents_path = params.latents_path(backbone.latents)
    run = {"replace": replace, "client": client, "on_error": on_error, "check_disk": check_disk}
    if not is_lossy(backbone.storage):
        extract(backbone, name, latents_path, out, **run)
        return None
    with store.writer_lock(out), store.writing(out):
        keys = list(FeatureStore.open_latents(latents_path).keys())
        fit = [keys[i] for i in fit_sample(len(keys), backbone.fit_images, backbone.seed)] \
            if parse_storage(backbone.storage)[0] == "pca" else []
        chosen, sample = sample_pairs(pd.read_parquet(params.data.pairs), params.fidelity.images, avoid=fit)
        extract(backbone, name, latents_path, out, first=chosen, **run)
        attrs = FeatureStore.as_written(out).attrs
        specs = params.match.transforms_for(name)
        measured = attrs.get("fidelity", {})
        if measured.get("sample") != chosen or measured.get("transforms") != specs:  # none yet, or another sample
            measure(backbone, name, latents_path, out, sample, chosen, specs)
            attrs = FeatureStore.as_written(out).attrs
        shutil.rmtree(reference_path(out), ignore_errors=True)  # a run killed after recording the figures left it
        problems = fidelity_problems(attrs, params.fidelity.min_identical, params.fidelity.max_pck_change)
        if problems:
            raise PipelineError(out, "fidelity", "; ".join(f"{layer}: {why}" for layer, why in problems)
                                + f" (on {len(chosen)} images, before the other {len(keys) - len(chosen)}: choose other "
                                "storage, or relax fidelity in params.yaml, and run again)")
        extract(backbone, name, latents_path, out, **(run | {"replace": "never"}))  # the same store: it resumes
    return attrs["fidelity"]["layers"]


def sample_pairs(pairs: pd.DataFrame, count: int, seed: int = 0, avoid=()) -> tuple[list[str], pd.DataFrame]:
    """Up to `count` images, taken pair by pair in a seeded order, and every pair of the split whose two
    images are among them; pairs with an image in `avoid` (those that fitted a pca store's axes) only when
    no other pair is left."""
    avoid = set(avoid)
    unseen = pairs[~pairs["src_image"].isin(avoid) & ~pairs["trg_image"].isin(avoid)]
    if len(unseen) and len(unseen) < len(pairs):
        return sample_pairs(unseen, count, seed)
    order = pairs.sample(frac=1.0, random_state=seed) if len(pairs) else pairs
    chosen: list[str] = []
    for pair in order.itertuples(index=False):
        new = [image for image in dict.fromkeys((pair.src_image, pair.trg_image)) if image not in chosen]
        if len(chosen) + len(new) > count:
            continue
        chosen += new
    inside = pairs["src_image"].isin(chosen) & pairs["trg_image"].isin(chosen)
    return sorted(chosen), pairs[inside]


def measure(params, name: str, latents_path, out, sample: pd.DataFrame, chosen: list[str], transform_specs) -> dict:
    """Extract the float16 reference of images `chosen`, match both stores on the `sample` pairs between them,
    record and return `fidelity` per layer."""
    fit = FeatureStore.as_written(out).attrs.get("fit_images", [])
    reference = extract(dataclasses.replace(params, storage="float16"), name, latents_path, reference_path(out),
                        replace="outdated", only=chosen, check_disk=False)

    def matched(maps):
        return match_store(maps, sample, protocols=["dift"], statistics="none", transform_specs=transform_specs)

    float16 = matched(StoreMaps(reference))
    per_variant = agreement(matched(StoreMaps(out)), float16)
    floor = agreement(matched(Bfloat16Maps(reference)), float16).groupby("layer")
    fidelity = {}
    for layer, rows in per_variant.groupby("layer", sort=True):
        # Every variant of a layer predicts the same keypoints: the mean of their rates is the pooled rate.
        fidelity[layer] = {"identical": float(rows["identical"].mean()), "pck_change": float(rows["pck_change"].max()),
                           "pairs": int(len(sample)), "predictions": int(rows["predictions"].sum()),
                           "bfloat16_identical": float(floor["identical"].mean()[layer]),
                           "bfloat16_pck_change": float(floor["pck_change"].max()[layer])}
    features = FeatureStore.for_writing(out)
    features.set_attrs(fidelity={"storage": params.storage, "images": len(chosen), "layers": fidelity,
                                 "images_in_fit": len(set(chosen) & set(fit)), "sample": list(chosen),
                                 "transforms": list(transform_specs)})
    features.consolidate()
    shutil.rmtree(reference_path(out))
    return fidelity


def reference_path(out) -> Path:
    """Where a lossy store's float16 reference is extracted while its fidelity is measured."""
    return Path(f"{out}.fidelity-reference")


def bfloat16_rounding(values: np.ndarray) -> np.ndarray:
    """float16 values rounded to bfloat16's 8 significant bits, as float16 again (within float16's range:
    65504 rounds up to 65536 in bfloat16)."""
    rounded = torch.from_numpy(values.astype(np.float32)).bfloat16().float().numpy()
    return np.clip(rounded, -65504, 65504).astype(np.float16)


class Bfloat16Maps(StoreMaps):
    """A float16 store's maps as if its features had been rounded to bfloat16 (`bfloat16_rounding`), in memory."""

    def raw(self, image: str, layer: str, timestep: int) -> np.ndarray:
        return bfloat16_rounding(super().raw(image, layer, timestep)).astype(np.float32)


def agreement(stored: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, timestep, transform) of two predictions tables of the same pairs: the fraction of
    identical predictions, the PCK@0.1 (bbox) change in points, and the predictions compared."""
    keys = ["layer", "timestep", "transform"]
    same = (stored[["pred_x", "pred_y"]].to_numpy() == reference[["pred_x", "pred_y"]].to_numpy()).all(1)
    rates = pd.Series(same, index=stored.index).groupby([stored[k] for k in keys]).agg(["mean", "size"])
    pck = [metrics.pck_table(t, alphas=(metrics.HEADLINE_ALPHA,)).query("category == 'all' and kind == 'per_image'")
           .set_index(keys)["pck"] for t in (stored, reference)]
    return pd.DataFrame({"identical": rates["mean"], "predictions": rates["size"],
                         "pck_change": 100 * (pck[0] - pck[1]).abs()}).reset_index()

