import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.analysis import correct, load_predictions
from pipeline.matching.match import match_store
from pipeline.evaluation.metrics import pck_table

VARIANTS = ["backbone", "layer", "timestep", "transform", "protocol"]


def test_predictions_dataset_gives_the_same_pck(demo_stores, tmp_path):
    frames = [match_store(demo_stores["stores"][name], demo_stores["pairs"]) for name in ("tiny-sd2", "vae-sd3")]
    for name, frame in zip(("a", "b"), frames):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    dataset = load_predictions(tmp_path)
    assert set(dataset.dims) == {"point", "variant"}
    assert set(dataset.indexes["variant"].names) == set(VARIANTS)
    both = pd.concat(frames)
    assert dataset.sizes["variant"] == len(both[VARIANTS].drop_duplicates())  # only the variants there are
    assert dataset.sizes["point"] == demo_stores["pairs"]["kps_ids"].map(len).sum()
    pck = correct(dataset).mean("point")  # per point PCK@0.1 of every variant
    table = pck_table(both)
    expected = table[(table["kind"] == "per_point") & (table["category"] == "all") & (table["alpha"] == 0.1)]
    assert len(expected) == dataset.sizes["variant"]
    for row in expected.itertuples():
        value = pck.sel(backbone=row.backbone, layer=row.layer, timestep=row.timestep, protocol=row.protocol,
                        transform=row.transform).item()
        assert value == row.pck
    # vae-sd3 has no up_blocks: that combination is simply not a variant.
    assert not ((pck["backbone"] == "vae-sd3") & (pck["layer"] == "up_blocks.1")).any()
    assert set(pck.sel(backbone="vae-sd3")["layer"].values) == {"latent"}
    best = pck.sel(protocol="dift", transform="raw", backbone="tiny-sd2").unstack("variant").max("timestep")
    assert best.idxmax("layer").item() == max(("up_blocks.1", "up_blocks.2"), key=lambda layer: best.sel(layer=layer).item())


def _sparse_predictions(points_per_pair: int = 10, pairs: int = 200, seed: int = 0):
    """Predictions of two backbones that share no layer and no timestep and one of two transforms: 24
    layers, 2 timesteps, 2 transforms and 2 protocols each. Rows shuffled, and 1 % of them dropped
    (points a variant missed)."""
    rng = np.random.default_rng(seed)
    variants = pd.DataFrame(
        [(backbone, f"{prefix}.{k}", t, transform, protocol)
         for backbone, prefix, timesteps, transforms in (("sd2", "up_blocks", (101, 261), ("raw", "ln")),
                                                         ("sd3", "transformer_blocks", (250, 500), ("raw", "drop:auto")))
         for k in range(24) for t in timesteps for transform in transforms for protocol in ("dift", "geoaware")],
        columns=VARIANTS)
    points = pd.DataFrame({
        "pair": np.repeat([f"cat:{i}" for i in range(pairs)], points_per_pair),
        "keypoint": np.tile(np.arange(points_per_pair), pairs),
    })
    points["category"] = "cat"
    points["src_image"] = points["pair"] + "/src"
    points["trg_image"] = points["pair"] + "/trg"
    points["trg_x"] = rng.uniform(0, 500, len(points))
    points["trg_y"] = rng.uniform(0, 400, len(points))
    points["threshold"] = np.repeat(rng.uniform(50, 300, pairs), points_per_pair)
    rows = len(points) * len(variants)
    frame = pd.concat([points.iloc[np.repeat(np.arange(len(points)), len(variants))].reset_index(drop=True),
                       variants.iloc[np.tile(np.arange(len(variants)), len(points))].reset_index(drop=True)], axis=1)
    frame["pair_id"] = np.repeat(np.arange(pairs), points_per_pair * len(variants))
    frame["pred_x"] = rng.integers(0, 500, rows).astype(float)
    frame["pred_y"] = rng.integers(0, 400, rows).astype(float)
    frame["distance"] = np.hypot(frame["pred_x"] - frame["trg_x"], frame["pred_y"] - frame["trg_y"])
    frame["sim_max"] = rng.uniform(-1, 1, rows).astype(np.float32)
    frame["dropped_channels"] = np.where(rng.uniform(size=rows) < 0.5, "", "3,17")
    kept = rng.permutation(rows)[: rows - rows // 100]
    return frame.iloc[kept].reset_index(drop=True), len(points), len(variants)


def test_sparse_variants_cost_only_the_variants_present():
    frame, n_points, n_variants = _sparse_predictions()
    product = int(np.prod([frame[c].nunique() for c in VARIANTS]))
    assert n_variants == 2 * 24 * 2 * 2 * 2 and product == 2 * 48 * 4 * 3 * 2  # what the dense layout would take

    dataset = load_predictions(frame)
    assert dict(dataset.sizes) == {"point": n_points, "variant": n_variants}
    assert dataset["distance"].size == n_points * n_variants
    assert {name: dataset[name].dtype for name in ("pred_x", "distance", "sim_max", "pair_id")} == {
        "pred_x": np.float64, "distance": np.float64, "sim_max": np.float32, "pair_id": np.float64}  # pair_id: some NaN
    # The whole dataset is smaller than ONE float64 array over the product of the variant columns.
    assert all(dataset[name].size == n_points * n_variants for name in dataset.data_vars)
    assert dataset.nbytes < n_points * product * 8

    # Every row round-trips exactly, found through the dataset's own indexes; the dropped rows are NaN.
    p = dataset.indexes["point"].get_indexer(frame["pair"] + "#" + frame["keypoint"].astype(str))
    v = dataset.indexes["variant"].get_indexer(pd.MultiIndex.from_frame(frame[VARIANTS]))
    assert (p >= 0).all() and (v >= 0).all()
    for name in ("pred_x", "pred_y", "distance", "sim_max", "pair_id", "dropped_channels"):
        np.testing.assert_array_equal(dataset[name].values[p, v], frame[name].to_numpy(), err_msg=name)
    assert int(dataset["distance"].notnull().sum()) == len(frame)
    for name in ("trg_x", "threshold", "src_image"):
        np.testing.assert_array_equal(dataset[name].values[p], frame[name].to_numpy(), err_msg=name)

    rng = np.random.default_rng(1)
    for row in frame.iloc[rng.choice(len(frame), 5, replace=False)].itertuples():
        cell = dataset.sel(point=f"{row.pair}#{row.keypoint}", backbone=row.backbone, layer=row.layer,
                           timestep=row.timestep, transform=row.transform, protocol=row.protocol)
        assert (cell["pred_x"].item(), cell["distance"].item(), cell["threshold"].item()) == (
            row.pred_x, row.distance, row.threshold)

    # Selection by level works as it did on dense dimensions.
    sd3 = dataset.sel(backbone="sd3")
    assert sd3.sizes["variant"] == n_variants // 2
    assert set(sd3["layer"].values) == {f"transformer_blocks.{k}" for k in range(24)}
    one = dataset.sel(layer="transformer_blocks.5", timestep=250)
    assert one.sizes["variant"] == 4 and set(one["backbone"].values) == {"sd3"}
    with pytest.raises(KeyError):  # a combination no store has is absent, not a block of NaN
        dataset.sel(backbone="sd2", layer="transformer_blocks.5")

    # PCK per variant from the dataset equals PCK straight from the table.
    pck = correct(dataset).mean("point").to_series()
    expected = (frame["distance"] / frame["threshold"] <= 0.1).groupby([frame[c] for c in VARIANTS]).mean()
    pd.testing.assert_series_equal(pck.sort_index(), expected.sort_index(), check_names=False)


def test_repeated_rows_are_refused():
    frame, _, _ = _sparse_predictions(points_per_pair=2, pairs=3)
    with pytest.raises(PipelineError, match=r"rows repeat a \(point, variant\)"):
        load_predictions(pd.concat([frame, frame.head(5)]))
