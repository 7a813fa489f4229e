"""A store kept with lossy `storage` measures what the encoding costs matching, and records it.

After extraction, the images of a sample of the split's pairs are extracted again as float16 (the same
seeded computation: the values the lossy store encoded) into `<store>.fidelity-reference`, both stores
are matched on those pairs with the `dift` protocol under every transform configured for the backbone,
and per layer the store's attrs get (`fidelity`): the fraction of predictions identical to float16's, and
the largest change of PCK@0.1 (bbox, in points) over the layer's timesteps and transforms. For scale, the
same two figures are recorded for the reference's own features rounded to bfloat16 (`bfloat16_identical`,
`bfloat16_pck_change`): how far predictions move with no encoding at all, from the last rounding of a model
computed in bfloat16 (FLUX in the real profile). On near-flat maps (random weights) even that moves a few
percent of predictions by a pixel. The reference is then deleted. `cli.py info` prints the figures
(pipeline/cache/store.py); `cli.py verify` fails below `fidelity.min_identical` or above
`fidelity.max_pck_change` (params.yaml; pipeline/cache/verify.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.cache import codecs, store


def after_extraction(params, name: str, out) -> dict | None:
    """What `extract` (stage and CLI) does once a store is complete: measure it, when its storage is lossy."""
    backbone = params.backbone(name)
    if not codecs.is_lossy(backbone.storage):
        return None
    return measure(backbone, name, params.latents_path(backbone.latents), out, pd.read_parquet(params.data.pairs),
                   params.match.transforms_for(name), params.fidelity.images)


def sample_pairs(pairs: pd.DataFrame, count: int, seed: int = 0) -> tuple[list[str], pd.DataFrame]:
    """Up to `count` images, taken pair by pair in a seeded order, and every pair of the split whose two
    images are among them."""
    order = pairs.sample(frac=1.0, random_state=seed) if len(pairs) else pairs
    chosen: list[str] = []
    for pair in order.itertuples(index=False):
        new = [image for image in dict.fromkeys((pair.src_image, pair.trg_image)) if image not in chosen]
        if len(chosen) + len(new) > count:
            continue
        chosen += new
    inside = pairs["src_image"].isin(chosen) & pairs["trg_image"].isin(chosen)
    return sorted(chosen), pairs[inside]


def measure(params, name: str, latents_path, out, pairs: pd.DataFrame, transform_specs, images: int = 24) -> dict:
    """Extract the sample's float16 reference, match both stores, record and return `fidelity` per layer."""
    from pipeline.cache.extract import extract
    from pipeline.matching.match import match_store

    chosen, sample = sample_pairs(pairs, images)
    reference_path = Path(f"{out}.fidelity-reference")
    reference = extract(dataclasses.replace(params, storage="float16"), name, latents_path, reference_path,
                        replace="outdated", only=chosen, check_disk=False)

    def matched(path):
        return match_store(path, sample, protocols=["dift"], statistics="none", transform_specs=transform_specs)

    float16 = matched(reference)
    per_variant = agreement(matched(out), float16)
    round_to_bfloat16(reference)
    floor = agreement(matched(reference), float16).groupby("layer")
    fidelity = {}
    for layer, rows in per_variant.groupby("layer", sort=True):
        # Every variant of a layer predicts the same keypoints: the mean of their rates is the pooled rate.
        fidelity[layer] = {"identical": float(rows["identical"].mean()), "pck_change": float(rows["pck_change"].max()),
                           "pairs": int(len(sample)), "predictions": int(rows["predictions"].sum()),
                           "bfloat16_identical": float(floor["identical"].mean()[layer]),
                           "bfloat16_pck_change": float(floor["pck_change"].max()[layer])}
    root = zarr.open_group(store.local(out), mode="r+", use_consolidated=False)
    root.attrs["fidelity"] = {"storage": params.storage, "images": len(chosen), "layers": fidelity}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root.store)
    shutil.rmtree(reference_path)
    return fidelity


def bfloat16_rounding(values: np.ndarray) -> np.ndarray:
    """float16 values rounded to bfloat16's 8 significant bits, as float16 again (within float16's range:
    65504 rounds up to 65536 in bfloat16)."""
    rounded = torch.from_numpy(values.astype(np.float32)).bfloat16().float().numpy()
    return np.clip(rounded, -65504, 65504).astype(np.float16)


def round_to_bfloat16(path) -> None:
    """Round a float16 features store's `features` to bfloat16 in place."""
    root = zarr.open_group(store.local(path), mode="r+", use_consolidated=False)
    for layer in store.layers(root):
        features = root[layer]["features"]
        for index in range(features.shape[0]):
            features[index] = bfloat16_rounding(features[index])


def agreement(stored: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, timestep, transform) of two predictions tables of the same pairs: the fraction of
    identical predictions, the PCK@0.1 (bbox) change in points, and the predictions compared."""
    from pipeline.evaluation import metrics

    keys = ["layer", "timestep", "transform"]
    same = (stored[["pred_x", "pred_y"]].to_numpy() == reference[["pred_x", "pred_y"]].to_numpy()).all(1)
    rates = pd.Series(same, index=stored.index).groupby([stored[k] for k in keys]).agg(["mean", "size"])
    pck = [metrics.pck_table(t, alphas=(metrics.HEADLINE_ALPHA,)).query("category == 'all' and kind == 'per_image'")
           .set_index(keys)["pck"] for t in (stored, reference)]
    return pd.DataFrame({"identical": rates["mean"], "predictions": rates["size"],
                         "pck_change": 100 * (pck[0] - pck[1]).abs()}).reset_index()

