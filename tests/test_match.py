"""Matching from the demo's cached stores: identity pairs, the naive protocol, the CLI, bad input."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.errors import PipelineError
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import match_store
from pipeline.evaluation.metrics import pck_table
from test_matching import naive_match


@pytest.mark.parametrize("backbone", ["tiny-sd2", "tiny-sd3", "vae-sd2", "vae-sd3"])
def test_identity_pairs_score_one(demo_stores, backbone):
    pairs = demo_stores["pairs"]
    identity = pairs[pairs["src_image"] == pairs["trg_image"]]
    assert len(identity) == 6
    predictions = match_store(demo_stores["stores"][backbone], identity)
    table = pck_table(predictions)
    head = table[(table["alpha"] == 0.1) & (table["category"] == "all")]
    assert (head["pck"] == 1.0).all()


@pytest.mark.parametrize("backbone", ["tiny-sd2", "tiny-sd3"])
def test_geoaware_predicts_the_centre_of_the_keypoints_own_cell_on_identity_pairs(demo_stores, backbone):
    # sd-dino / GeoAware-SC: the keypoint's patch (canvas coordinate / stride, truncated) is its own best
    # match, and the prediction is that patch's centre, mapped back to the image (not the keypoint itself).
    pairs = demo_stores["pairs"]
    identity = pairs[pairs["src_image"] == pairs["trg_image"]]
    maps = StoreMaps(demo_stores["stores"][backbone])
    predictions = match_store(maps, identity, protocols=["geoaware"])
    image = maps.images.loc[predictions["trg_image"]]
    stride = predictions["layer"].map(lambda layer: maps.root[layer].attrs["stride"]).to_numpy()
    for axis, valid, size in (("x", "valid_x1", "width"), ("y", "valid_y1", "height")):
        scale = image[valid].to_numpy() / image[size].to_numpy()  # canvas pixels per image pixel
        centre = (np.floor(predictions[f"src_{axis}"].to_numpy() * scale / stride) + 0.5) * stride / scale
        np.testing.assert_allclose(predictions[f"pred_{axis}"], centre, rtol=1e-12)
    assert (predictions["pred_x"] != predictions["src_x"]).any()  # a cell centre, not the keypoint


@pytest.mark.parametrize("backbone", ["tiny-sd2", "tiny-sd3", "vae-sd2", "vae-sd3"])
@pytest.mark.slow
def test_dift_equals_naive_dift_on_demo_store(demo_stores, backbone):
    path = demo_stores["stores"][backbone]
    pairs = demo_stores["pairs"]
    predictions = match_store(path, pairs, statistics="none")
    maps = StoreMaps(path)
    naive = predictions.copy()
    ties = total = 0
    for (layer, timestep), rows in predictions.groupby(["layer", "timestep"]):
        for pair in pairs.itertuples():
            points = np.array([list(p) for p in pair.src_kps])
            expected, cos = naive_match(maps.load(pair.src_image, layer, timestep),
                                        maps.load(pair.trg_image, layer, timestep), points)
            selected = rows.index[rows["pair"] == pair.filename]
            naive.loc[selected, ["pred_x", "pred_y"]] = expected
            mine = rows.loc[selected, ["pred_x", "pred_y"]].to_numpy().astype(np.int64)
            for k in np.flatnonzero(~(mine == expected).all(1)):
                (x, y), (ex, ey) = mine[k], expected[k]
                assert cos[k, y, x] == pytest.approx(cos[k, ey, ex], abs=1e-5)  # differences are ties only
                ties += 1
            total += len(points)
    assert ties / total <= 0.01 and total == len(predictions)
    np.testing.assert_allclose(pck_table(predictions)["pck"], pck_table(naive)["pck"], atol=0.01)


def test_predictions_table_columns(demo_stores):
    predictions = match_store(demo_stores["stores"]["tiny-sd3"], demo_stores["pairs"], layers=["transformer_blocks.3"])
    expected = {"split", "pair", "category", "src_image", "trg_image", "keypoint", "src_x", "src_y", "trg_x", "trg_y",
                "pred_x", "pred_y", "distance", "threshold", "image_size", "backbone", "layer", "timestep", "protocol",
                "transform", "dropped_channels", "sim_max", "sim_mean", "sim_std", "canvas_scale", "canvas_x0", "canvas_y0"}
    assert set(predictions.columns) == expected
    full = match_store(demo_stores["stores"]["tiny-sd3"], demo_stores["pairs"], layers=["transformer_blocks.3"],
                       statistics="all")
    assert set(full.columns) == expected | {"sim_entropy", "sim_peak_ratio"}
    pd.testing.assert_frame_equal(full[predictions.columns], predictions)
    predictions = full
    assert len(predictions) == demo_stores["pairs"]["kps_ids"].map(len).sum()
    assert set(predictions["layer"]) == {"transformer_blocks.3"}
    assert predictions["sim_entropy"].between(0, 1).all() and (predictions["sim_max"] <= 1 + 1e-5).all()
    assert not predictions.duplicated(["pair", "keypoint", "layer", "timestep"]).any()
    assert predictions[["canvas_scale", "canvas_x0", "canvas_y0"]].isna().all().all()  # dift: judged in image pixels


def test_cli_match_prints_per_layer_pck(demo_stores, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    demo_stores["pairs"].to_parquet(pairs)
    out = tmp_path / "p.parquet"
    store = str(demo_stores["stores"]["tiny-sd2"])
    result = CliRunner().invoke(cli, ["match", "--store", store, "--pairs", str(pairs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "up_blocks.1" in result.output and "up_blocks.2" in result.output and "PCK@0.1" in result.output
    assert set(pd.read_parquet(out)["layer"]) == {"up_blocks.1", "up_blocks.2"}
    result = CliRunner().invoke(cli, ["match", "--store", store, "--pairs", str(pairs), "--layer", "up_blocks.7"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {store}: layer: unknown layer 'up_blocks.7'; the store has ['up_blocks.1', 'up_blocks.2']"


def test_store_without_the_pair_images_is_refused(demo_stores):
    pairs = demo_stores["pairs"].copy()
    pairs.loc[0, "trg_image"] = "star/not_there"
    with pytest.raises(PipelineError, match=r"image: store has no image 'star/not_there'"):
        match_store(demo_stores["stores"]["vae-sd2"], pairs)


@pytest.mark.parametrize("protocol", ["dift", "geoaware"])
def test_a_query_gets_the_same_answer_alone_or_in_any_batch(demo_stores, protocol):
    """BLAS sums a row in another order for another batch size: a pair's queries, one clicked point, or a
    worker's share must still see bit-identical similarities, or near-tied argmaxes move between runs."""
    import torch

    from pipeline.matching.protocols import match_queries, prepare_target, source_queries

    maps = StoreMaps(demo_stores["stores"]["tiny-sd3"])
    pair = demo_stores["pairs"].iloc[3]
    source, target = (maps.load(image, "transformer_blocks.3", 261) for image in (pair.src_image, pair.trg_image))
    points = np.array([[x, y] for x in range(3, source.width, 11) for y in range(2, source.height, 13)])[:40]
    queries = source_queries(source, None, points, protocol)
    prepared = prepare_target(target, protocol)
    together, _ = match_queries(target, queries, protocol, statistics="none", prepared=prepared)
    for size in (1, 2, 3, 5, 7):
        for start in range(0, len(queries), size):
            alone, _ = match_queries(target, queries[start:start + size], protocol, statistics="none", prepared=prepared)
            np.testing.assert_array_equal(alone, together[start:start + size])
    if protocol == "dift":
        batch = torch.from_numpy(queries)
        all_dots = prepared.dots(batch)
        for i in (0, 7, 39):
            assert torch.equal(prepared.dots(batch[i:i + 1])[0], all_dots[i])  # bit for bit
