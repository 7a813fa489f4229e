"""Fusion at match time equals matching one store that holds the concatenated normalised features."""

import numpy as np
import pandas as pd
from click.testing import CliRunner

from cli import cli
from pipeline.cache import store
from pipeline.matching.fusion import FusedMaps
from pipeline.cache.maps import StoreMaps
from pipeline.matching.match import match_store


def test_fusion_equals_a_store_of_concatenated_normalised_features(demo_stores, tmp_path):
    a, b = demo_stores["stores"]["tiny-sd2"], demo_stores["stores"]["tiny-sd3"]
    layers, weights = ["up_blocks.1", "transformer_blocks.1"], [0.7, 0.3]
    fused = FusedMaps([a, b], layers, [261, 261], weights)
    pairs = demo_stores["pairs"]
    predictions = match_store(fused, pairs)

    # The same features written as one store through the documented schema.
    maps = [StoreMaps(a), StoreMaps(b)]
    images = store.read_images(maps[0].root)
    root = store.open_store(tmp_path / "concat.zarr", {"kind": "features", "name": "concat", "determinants": {}},
                            images, [261], overwrite=False)
    for index, key in enumerate(images["image"]):
        parts = []
        for m, layer, weight in zip(maps, layers, weights):
            x = m.raw(key, layer, 261)
            parts.append(weight * x / np.linalg.norm(x, axis=-1, keepdims=True))
        features = np.concatenate(parts, axis=-1)
        h, w, c = features.shape
        node = store.ensure_layer(root, "concat", {"features": (("timestep", "y", "x", "channel"), (1, h, w, c))},
                                  {"y": np.arange(h) * 16.0 + 8, "x": np.arange(w) * 16.0 + 8, "channel": np.arange(c)},
                                  {"stride": 16.0}, dtype="float32")
        node["features"][index] = features[None]
        store.mark_done(root, index, 0.0, 0)
    single = match_store(tmp_path / "concat.zarr", pairs)
    assert len(single) == len(predictions)
    assert (single["pred_x"].to_numpy() == predictions["pred_x"].to_numpy()).all()
    assert (single["pred_y"].to_numpy() == predictions["pred_y"].to_numpy()).all()
    assert predictions["backbone"].iloc[0] == "tiny-sd2*0.7+tiny-sd3*0.3"


def test_cli_fuses_stores_of_different_grids(demo_stores, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    demo_stores["pairs"].head(4).to_parquet(pairs)
    stores = [str(demo_stores["stores"][name]) for name in ("tiny-sd2", "vae-sd3")]  # 8x8 and 16x16 cells
    result = CliRunner().invoke(cli, ["match", "--store", stores[0], "--store", stores[1], "--layer", "up_blocks.1",
                                      "--layer", "latent", "--timestep", "261", "--timestep", "5",
                                      "--weights", "0.5,0.5", "--pairs", str(pairs), "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 2 and "timestep: unknown timestep 5; the store has [261]" in result.output
    result = CliRunner().invoke(cli, ["match", "--store", stores[0], "--store", stores[1], "--layer", "up_blocks.1",
                                      "--layer", "latent", "--timestep", "261", "--timestep", "261",
                                      "--weights", "0.5,0.5", "--pairs", str(pairs), "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 0, result.output
    fused = pd.read_parquet(tmp_path / "f.parquet")
    assert set(fused["layer"]) == {"up_blocks.1+latent"} and len(fused) == demo_stores["pairs"].head(4)["kps_ids"].map(len).sum()
