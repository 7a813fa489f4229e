import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.evaluation import metrics
from pipeline.evaluation.figures import VIRIDIS
from conftest import EXPLORED_SD2 as SD2, EXPLORED_SD3 as SD3, cross_pair
from pipeline.matching.maps import Variant



def test_click_on_a_keypoint_shows_matchs_prediction_and_pck(explored, demo_stores):
    explorer, tables = explored
    pair = cross_pair(demo_stores["pairs"])
    for keypoint in range(len(pair["kps_ids"])):
        answer = explorer.click(SD3 + [SD2], None, pair=pair["filename"], keypoint=keypoint)
        for shown in answer["maps"]:
            v = shown["variant"]
            table = tables[v["store"]]
            row = table[(table["pair"] == pair["filename"]) & (table["layer"] == v["layer"])
                        & (table["transform"] == v["transform"]) & (table["protocol"] == "dift")].iloc[keypoint]
            assert shown["predicted"] == [row["pred_x"], row["pred_y"]], (v, keypoint)
            assert shown["true"] == [row["trg_x"], row["trg_y"]]
    # The pair's PCK@0.1 per variant, as `evaluate` scores the predictions table.
    table = tables["tiny-sd3"]
    mine = table[(table["pair"] == pair["filename"]) & (table["protocol"] == "dift")]
    expected = metrics.pair_scores(mine, alphas=(0.1,), thresholds=("bbox", "img"))
    for shown in answer["maps"][:2]:
        for family in ("bbox", "img"):
            score = expected[(expected["layer"] == shown["variant"]["layer"]) & (expected["threshold_by"] == family)
                             & (expected["transform"] == shown["variant"]["transform"])].iloc[0]
            assert shown["pck"][family] == score["correct"] / score["points"]


def test_free_click_map_and_prediction_against_a_naive_reference(explored, demo_stores):
    """Any point: the map is DIFT's upsampled cosine map (computed here the naive way), drawn as viridis over
    its min-max range, its brightest pixel the prediction; the histogram counts every target pixel."""
    explorer, _ = explored
    pair = cross_pair(demo_stores["pairs"], 2)
    point = (pair["src_width"] - 7, 11)  # asymmetric, near a corner: a transposed grid would miss it
    answer = explorer.click([SD3[0]], point, pair=pair["filename"])
    shown = answer["maps"][0]
    maps = explorer.maps["tiny-sd3"]

    def upsampled(image):
        raw = torch.from_numpy(maps.raw(image, SD3[0].layer, 261)).permute(2, 0, 1)[None].double()
        info = maps.images.loc[image]
        return F.interpolate(raw, size=(int(info["height"]), int(info["width"])), mode="bilinear", align_corners=False)[0]

    source, target = upsampled(pair["src_image"]), upsampled(pair["trg_image"])
    query = source[:, point[1], point[0]]
    cosine = (torch.einsum("c,chw->hw", query, target) / (query.norm() * target.norm(dim=0))).numpy()
    y, x = np.unravel_index(cosine.argmax(), cosine.shape)
    assert answer["point"] == list(point) and shown["predicted"] == [x, y]
    with Image.open(io.BytesIO(base64.b64decode(shown["map"].split(",", 1)[1]))) as png:
        assert png.size == (pair["trg_width"], pair["trg_height"]) and png.mode == "P"
        assert np.array_equal(np.array(png.getpalette()[:768]).reshape(256, 3), VIRIDIS)
        levels = np.asarray(png)
    expected = np.rint(255 * (cosine - cosine.min()) / (cosine.max() - cosine.min()))
    assert np.abs(levels.astype(int) - expected).max() <= 1 and levels[y, x] == 255
    assert sum(shown["histogram"]["counts"]) == pair["trg_width"] * pair["trg_height"]
    assert shown["sharpness"]["sim_max"] == pytest.approx(cosine.max(), abs=1e-5)
    assert shown["sharpness"]["sim_mean"] == pytest.approx(cosine.mean(), abs=1e-5)


def test_browsing_pairs(explored, demo_stores):
    explorer, tables = explored
    pairs = demo_stores["pairs"]
    listing = explorer.pair_list(limit=5)
    assert listing["total"] == len(pairs) and [p["pair"] for p in listing["pairs"]] == list(pairs["filename"][:5])
    assert {p["category"] for p in explorer.pair_list(category="blob")["pairs"]} == {"blob"}
    flagged = explorer.pair_list(flag="viewpoint_variation", value=2)["pairs"]
    assert {p["pair"] for p in flagged} == set(pairs.loc[pairs["viewpoint_variation"] == 2, "filename"])

    def correct(name, layer):  # DIFT's PCK@0.1 per keypoint, computed here from the tables' columns
        t = tables[name]
        t = t[(t["layer"] == layer) & (t["transform"] == "raw") & (t["protocol"] == "dift")]
        return pd.Series((t["distance"] <= 0.1 * t["threshold"]).to_numpy(), index=[t["pair"], t["keypoint"]])

    right, wrong = correct("tiny-sd3", "transformer_blocks.3"), correct("tiny-sd2", "up_blocks.1")
    expected = (right & ~wrong).groupby(level=0).sum()
    expected = expected[expected > 0]
    listed = explorer.pair_list(right="tiny-sd3", wrong="tiny-sd2")["pairs"]
    assert {p["pair"]: p["disagreements"] for p in listed} == expected.to_dict()
    assert [p["disagreements"] for p in listed] == sorted(expected, reverse=True)
    assert len(listed) and expected.to_dict() != {p: n for p, n in (~right & wrong).groupby(level=0).sum().items() if n}


def test_bad_requests_are_one_line_errors(explored):
    explorer, _ = explored
    with pytest.raises(PipelineError, match="no pair named 'nope'"):
        explorer.click([SD2], (1, 1), pair="nope")
    with pytest.raises(PipelineError, match="no store named 'sd9'"):
        explorer.click([Variant("sd9", "x", 0)], (1, 1), src="star/demo_00000", trg="star/demo_00001")
    with pytest.raises(PipelineError, match="unknown layer 'down'"):
        explorer.click([Variant("tiny-sd2", "down", 261)], (1, 1), src="star/demo_00000", trg="star/demo_00001")
    with pytest.raises(PipelineError, match="no predictions for store 'vae-sd2'"):
        explorer.pair_list(right="vae-sd2", wrong="tiny-sd2")
    with pytest.raises(PipelineError, match="wrong: choose both"):
        explorer.pair_list(right="tiny-sd3")
    with pytest.raises(PipelineError, match="'drop:01' is not configured for 'tiny-sd3'"):
        explorer.click([Variant("tiny-sd3", "transformer_blocks.1", 261, "drop:01")], (1, 1), src="star/demo_00000",
                       trg="star/demo_00001")
    with pytest.raises(PipelineError, match=r"point: \(1, 9999\) is outside the source image"):
        explorer.click([SD2], (1, 9999), src="star/demo_00000", trg="star/demo_00001")


def test_server_answers_over_http(explored, demo_stores):
    from pipeline.explorer.server import Background

    explorer, tables = explored
    server = Background(explorer)
    try:
        def call(path, body=None):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(server.base + path, data=data, headers={
                "Content-Type": "application/json", "Authorization": f"token {server.token}"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()

        status, page = call("")
        assert status == 200 and b"explorer.js" in page
        catalogue = json.loads(call("api/catalogue")[1])
        assert {s["name"] for s in catalogue["stores"]} == set(explorer.maps)
        pair = cross_pair(demo_stores["pairs"], 1)
        answer = json.loads(call("api/click", {"pair": pair["filename"], "keypoint": 3,
                                               "variants": [vars(SD2)]})[1])
        table = tables["tiny-sd2"]
        row = table[(table["pair"] == pair["filename"]) & (table["layer"] == SD2.layer) & (table["protocol"] == "dift")
                    & (table["transform"] == "raw")].iloc[3]
        assert answer["maps"][0]["predicted"] == [row["pred_x"], row["pred_y"]]
        status, jpeg = call(f"image?key={pair['trg_image']}")
        assert jpeg[:2] == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError) as failed:
            call("api/click", {"pair": "nope", "keypoint": 0, "variants": [vars(SD2)]})
        assert failed.value.code == 400 and json.loads(failed.value.read())["error"].startswith("pair: no pair named")
    finally:
        server.stop()


def test_cli_explore_bad_input(demo_stores, tmp_path, monkeypatch):
    import socket

    from click.testing import CliRunner

    from cli import cli
    from conftest import demo_project

    monkeypatch.chdir(demo_project(demo_stores, tmp_path))
    result = CliRunner().invoke(cli, ["explore"])
    assert result.exit_code == 2 and result.output == "error: store: no store under store/; run `dvc repro` or pass --store\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["explore", "--store", str(demo_stores["stores"]["tiny-sd2"]), "--port", str(port)])
    assert result.exit_code == 2
    assert result.output == f"error: port: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port\n"
