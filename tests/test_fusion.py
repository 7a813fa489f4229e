"""Fusion at match time equals matching one store that holds the concatenated normalised features."""

import numpy as np
import pandas as pd
from click.testing import CliRunner

from cli import cli
from pipeline.cache.store import FeatureStore
from pipeline.matching.fusion import FusedMaps
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import match_store


def test_fusion_equals_a_store_of_concatenated_normalised_features(demo_stores, tmp_path):
    a, b = demo_stores["stores"]["tiny-sd2"], demo_stores["stores"]["tiny-sd3"]
    layers, weights = ["up_blocks.1", "transformer_blocks.1"], [0.7, 0.3]
    fused = FusedMaps([a, b], layers, [261, 261], weights)
    pairs = demo_stores["pairs"]
    predictions = match_store(fused, pairs)

    # The same features written as one store through the documented schema.
    maps = [StoreMaps(a), StoreMaps(b)]
    images = maps[0].store.images()
    concat = FeatureStore.create(tmp_path / "concat.zarr", {"kind": "features", "name": "concat", "determinants": {}},
                                 images, [261], replace="never")
    for index, key in enumerate(images["image"]):
        parts = []
        for m, layer, weight in zip(maps, layers, weights):
            x = m.raw(key, layer, 261)
            parts.append(weight * x / np.linalg.norm(x, axis=-1, keepdims=True))
        features = np.concatenate(parts, axis=-1)
        h, w, c = features.shape
        node = concat.ensure_layer("concat", {"features": (("timestep", "y", "x", "channel"), (1, h, w, c))},
                                   {"y": np.arange(h) * 16.0 + 8, "x": np.arange(w) * 16.0 + 8, "channel": np.arange(c)},
                                   {"stride": 16.0}, dtype="float32")
        node["features"][index] = features[None]
        concat.mark_done(index, 0.0, 0)
    single = match_store(tmp_path / "concat.zarr", pairs)
    assert len(single) == len(predictions)
    assert (single["pred_x"].to_numpy() == predictions["pred_x"].to_numpy()).all()
    assert (single["pred_y"].to_numpy() == predictions["pred_y"].to_numpy()).all()
    assert predictions["backbone"].iloc[0] == "tiny-sd2*0.7+tiny-sd3*0.3"


def test_cli_fuses_stores_of_different_grids(demo_stores, tmp_path, monkeypatch):
    # The demo stores are not the project's (the repository's params.yaml has a `vae-sd3` of its own, which
    # would find this one stale): read them outside the project.
    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    demo_stores["pairs"].head(4).to_parquet(pairs)
    stores = [str(demo_stores["stores"][name]) for name in ("tiny-sd2", "vae-sd3")]  # 8x8 and 16x16 cells
    result = CliRunner().invoke(cli, ["match", "--store", stores[0], "--store", stores[1], "--layer", "up_blocks.1",
                                      "--layer", "latent", "--timestep", "261", "--timestep", "5",
                                      "--weights", "0.5,0.5", "--pairs", str(pairs), "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 2 and "timestep: unknown timestep 5; the store has [261]" in result.output
    result = CliRunner().invoke(cli, ["match", "--store", stores[0], "--store", stores[1], "--layer", "up_blocks.1",
                                      "--layer", "latent", "--timestep", "261", "--timestep", "261", "--protocol", "dift",
                                      "--weights", "0.5,0.5", "--pairs", str(pairs), "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 0, result.output
    fused = pd.read_parquet(tmp_path / "f.parquet")
    assert set(fused["layer"]) == {"up_blocks.1+latent"} and len(fused) == demo_stores["pairs"].head(4)["kps_ids"].map(len).sum()


# ---- FusedMaps against a naive reference --------------------------------------------------------


def _naive_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(h, w, C) -> (out_h, out_w, C), bilinear with align_corners=False, one output cell at a time: the
    source coordinate of output cell i is (i + 0.5) * h / out_h - 0.5, clamped at 0; its taps are floor()
    and the next cell (the last cell at the border)."""
    h, w, c = x.shape
    out = np.zeros((out_h, out_w, c))
    for i in range(out_h):
        sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, w - 1), sx - x0
            for k in range(c):
                out[i, j, k] = ((1 - ly) * (1 - lx) * x[y0, x0, k] + (1 - ly) * lx * x[y0, x1, k]
                                + ly * (1 - lx) * x[y1, x0, k] + ly * lx * x[y1, x1, k])
    return out


def _store_of(path, name: str, images: pd.DataFrame, layer: str, maps: list[np.ndarray], stride: float):
    """A features store with one layer holding `maps` (one (h, w, C) map per image), as float32."""
    features_store = FeatureStore.create(path, {"kind": "features", "name": name, "determinants": {"name": name}}, images, [261])
    h, w, c = maps[0].shape
    node = features_store.ensure_layer(layer, {"features": (("timestep", "y", "x", "channel"), (1, h, w, c))},
                                       {"y": (np.arange(h) + 0.5) * stride, "x": (np.arange(w) + 0.5) * stride,
                                        "channel": np.arange(c)}, {"stride": stride}, dtype="float32")
    for index, features in enumerate(maps):
        node["features"][index] = features[None].astype(np.float32)
        features_store.mark_done(index, 0.0, 0)
    return path


def test_fused_map_equals_a_naive_reference(tmp_path):
    """Two stores of different, non-square grids (4 x 6 cells of 32 px and 8 x 12 of 16 px over a 192 x 128
    canvas), the coarse one first, cells of very different norms: the fused map is each map normalised
    per cell, the coarse one resampled to 8 x 12 (bilinear, align_corners=False), weighted, concatenated."""
    rng = np.random.default_rng(7)
    images = pd.DataFrame({"image": ["cat/a", "cat/b"], "category": ["cat", "cat"], "width": [300, 240],
                           "height": [200, 160], "valid_x0": [0.0, 0.0], "valid_y0": [0.0, 0.0],
                           "valid_x1": [192.0, 192.0], "valid_y1": [128.0, 128.0]})

    def maps(h, w, c):  # random directions, per-cell norms spread over two decades
        return [rng.normal(size=(h, w, c)) * rng.uniform(0.1, 10.0, size=(h, w, 1)) for _ in range(len(images))]

    coarse, fine = maps(4, 6, 3), maps(8, 12, 5)
    paths = [_store_of(tmp_path / "coarse.zarr", "coarse", images, "blocks.coarse", coarse, 32.0),
             _store_of(tmp_path / "fine.zarr", "fine", images, "blocks.fine", fine, 16.0)]
    weights = [0.7, 0.2]
    fused = FusedMaps(paths, ["blocks.coarse", "blocks.fine"], [261, 261], weights)

    for index, image in enumerate(images["image"]):
        got = fused.load(image, "blocks.coarse+blocks.fine", 261)
        a = coarse[index].astype(np.float32).astype(np.float64)  # what the store holds
        b = fine[index].astype(np.float32).astype(np.float64)
        a /= np.sqrt((a ** 2).sum(axis=-1, keepdims=True))
        b /= np.sqrt((b ** 2).sum(axis=-1, keepdims=True))
        resampled = _naive_bilinear(a, 8, 12)
        expected = np.concatenate([weights[0] * resampled, weights[1] * b], axis=-1)
        assert got.features.shape == (8, 12, 8) and got.features.dtype == np.float32
        np.testing.assert_allclose(got.features, expected, rtol=0, atol=1e-5)
        # The fused map lies over the image as the finest map does.
        assert got.stride == 16.0
        assert (got.width, got.height, got.valid_x1, got.valid_y1) == (images.at[index, "width"],
                                                                        images.at[index, "height"], 192.0, 128.0)
        # The reference is discriminating: nearest-neighbour upsampling, or resampling before normalising,
        # would differ from it by far more than the tolerance.
        nearest = np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)
        assert np.abs(nearest - resampled).max() > 0.1
        unnormalised = _naive_bilinear(coarse[index].astype(np.float64), 8, 12)
        after = unnormalised / np.linalg.norm(unnormalised, axis=-1, keepdims=True)
        assert np.abs(after - resampled).max() > 0.1
