import json
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.data.predictions import COVERAGE_KEY, bbox_threshold, read_coverage
from pipeline.evaluation.metrics import format_headline, score_files, best_variants, metrics_summary, pck_table


def _predictions(**variant):
    # pair a: 2 keypoints off by 10 and 11 px, pair b: exact, pair c (other category): off by 50 px.
    frame = pd.DataFrame({
        "pair": ["a", "a", "b", "c"], "category": ["cat", "cat", "cat", "dog"],
        "trg_x": [5, 5, 5, 5], "trg_y": [7, 7, 7, 7],
        "pred_x": [15, 5, 5, 5], "pred_y": [7, 18, 7, 57], "threshold": [100.0] * 4,
    })
    return frame.assign(**variant)


def _pck(table, kind, category, alpha, **variant):
    rows = table[(table["kind"] == kind) & (table["category"] == category) & np.isclose(table["alpha"], alpha)]
    for column, value in variant.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1
    return rows["pck"].item()


def test_threshold_is_the_longer_box_side_without_plus_one():
    assert bbox_threshold([36, 92, 500, 200]) == 464.0
    assert bbox_threshold([10, 10, 20, 60]) == 50.0


def test_boundary_is_inclusive():
    table = pck_table(_predictions())
    # distance 10 with threshold 100 is exactly alpha 0.1: correct; 11 is not.
    assert _pck(table, "per_point", "all", 0.1) == pytest.approx(2 / 4)
    assert _pck(table, "per_point", "all", 0.05) == pytest.approx(1 / 4)
    assert _pck(table, "per_point", "all", 0.15) == pytest.approx(3 / 4)


def test_per_image_differs_from_per_point():
    table = pck_table(_predictions())
    # per image: mean over pairs of (1/2, 1, 0); per point: 2 of 4.
    assert _pck(table, "per_image", "all", 0.1) == pytest.approx((0.5 + 1 + 0) / 3)
    assert _pck(table, "per_point", "all", 0.1) == pytest.approx(0.5)
    assert _pck(table, "per_image", "cat", 0.1) == pytest.approx(0.75)
    assert _pck(table, "per_point", "cat", 0.1) == pytest.approx(2 / 3)
    assert _pck(table, "per_image", "dog", 0.1) == 0.0
    # mean of categories weighs the one-pair category like the two-pair one.
    assert _pck(table, "per_image", "mean", 0.1) == pytest.approx((0.75 + 0) / 2)
    assert _pck(table, "per_point", "mean", 0.1) == pytest.approx((2 / 3 + 0) / 2)


def test_variants_are_scored_separately():
    exact = _predictions(layer="up_blocks.1", timestep=261).assign(pred_x=5, pred_y=7)
    table = pck_table(pd.concat([_predictions(layer="up_blocks.0", timestep=261), exact]))
    assert set(table["layer"]) == {"up_blocks.0", "up_blocks.1"}
    assert _pck(table, "per_point", "all", 0.01, layer="up_blocks.1") == 1.0
    assert _pck(table, "per_point", "all", 0.1, layer="up_blocks.0") == pytest.approx(0.5)
    summary = metrics_summary(table)["PCK@0.1"]
    assert summary["up_blocks.1"]["261"]["bbox"]["per_image"] == 1.0
    assert summary["up_blocks.0"]["261"]["bbox"]["per_image_mean_of_categories"] == 0.375
    assert best_variants(table) == {"all": {"layer": "up_blocks.1", "timestep": 261, "threshold_by": "bbox", "per_image": 1.0,
                                            "per_point": 1.0, "per_image_mean_of_categories": 1.0,
                                            "pairs": 3, "split_pairs": 3, "alpha": 0.1}}


def test_geoaware_counts_strictly_and_img_scales_by_the_image_side():
    # sd-dino and GeoAware-SC count err < alpha x size; DIFT counts <=. The 10 px error of pair a sits exactly
    # on alpha 0.1 x 100: correct under dift, not under geoaware.
    both = pd.concat([_predictions(protocol="dift"), _predictions(protocol="geoaware")]).assign(image_size=[200.0, 110.0, 50.0, 500.0] * 2)
    table = pck_table(both, thresholds=("bbox", "img"))
    assert _pck(table, "per_point", "all", 0.1, protocol="dift", threshold_by="bbox") == pytest.approx(2 / 4)
    assert _pck(table, "per_point", "all", 0.1, protocol="geoaware", threshold_by="bbox") == pytest.approx(1 / 4)
    # img: errors 10, 11, 0, 50 over image sides 200, 110, 50, 500 -> ratios 0.05, 0.1, 0, 0.1.
    assert _pck(table, "per_point", "all", 0.05, protocol="dift", threshold_by="img") == pytest.approx(2 / 4)
    assert _pck(table, "per_point", "all", 0.1, protocol="dift", threshold_by="img") == pytest.approx(4 / 4)
    assert _pck(table, "per_point", "all", 0.1, protocol="geoaware", threshold_by="img") == pytest.approx(2 / 4)
    # The best variant is chosen in DIFT's setting, not where the looser image threshold scores higher.
    assert best_variants(table)["all"]["threshold_by"] == "bbox" and best_variants(table)["all"]["protocol"] == "dift"
    with pytest.raises(PipelineError, match=r"missing columns \['image_size'\]"):
        pck_table(_predictions(), thresholds=("img",))


def test_identity_predictions_score_one():
    frame = _predictions().assign(pred_x=5, pred_y=7)
    table = pck_table(frame)
    assert (table["pck"] == 1.0).all()


def test_missing_columns_are_named():
    with pytest.raises(PipelineError, match=r"predictions: missing columns \['threshold'\]"):
        pck_table(_predictions().drop(columns="threshold"))


def test_coverage_counts_the_pairs_of_the_split_not_just_the_scored_ones(tmp_path):
    frame = _predictions(layer="l")
    frame.attrs[COVERAGE_KEY] = {"pairs": {"cat": 3, "dog": 2, "eel": 1},
                                 "skipped": [["d", "dog", "image not extracted"], ["e", "eel", "image not extracted"]]}
    table = pck_table(frame)
    rows = table[(table["kind"] == "per_image") & np.isclose(table["alpha"], 0.1)].set_index("category")
    assert rows.loc["all", "pairs"] == 3 and rows.loc["all", "split_pairs"] == 6
    assert rows.loc["cat", "split_pairs"] == 3 and rows.loc["dog", "split_pairs"] == 2
    assert (rows.loc["dog", "pairs"], rows.loc["mean", "split_pairs"]) == (1, 6)
    summary = metrics_summary(table)["PCK@0.1"]
    assert summary["l"]["bbox"]["pairs"] == 3 and summary["l"]["bbox"]["split_pairs"] == 6
    assert "3/6" in format_headline(table)

    # The same numbers from a predictions file whose metadata carries the coverage, read in shards.
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**arrow.schema.metadata, COVERAGE_KEY.encode(): json.dumps(frame.attrs[COVERAGE_KEY]).encode()})
    pq.write_table(arrow, tmp_path / "p.parquet", row_group_size=1)
    assert read_coverage(tmp_path / "p.parquet")["skipped"][0] == ["d", "dog", "image not extracted"]
    from_file = score_files([tmp_path / "p.parquet"], row_groups=1)
    pd.testing.assert_frame_equal(from_file, table)
