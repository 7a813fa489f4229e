import base64
import io
import json
import shutil
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
from pipeline.explorer import Explorer, Variant
from pipeline.matching.match import match_store

SD3 = [Variant("tiny-sd3", "transformer_blocks.3", 261, "raw"), Variant("tiny-sd3", "transformer_blocks.1", 261, "drop:auto+adaln")]
SD2 = Variant("tiny-sd2", "up_blocks.1", 261, "raw")


@pytest.fixture(scope="module")
def explored(demo_stores, tmp_path_factory):
    """An explorer over the demo stores, with predictions tables of two of them for the comparisons."""
    folder = tmp_path_factory.mktemp("predictions")
    pairs = demo_stores["pairs"]
    predictions = {}
    for name, specs in (("tiny-sd2", ["raw"]), ("tiny-sd3", ["raw", "drop:auto+adaln"])):
        table = match_store(demo_stores["stores"][name], pairs, transform_specs=specs)
        predictions[name] = folder / f"{name}.parquet"
        table.to_parquet(predictions[name])
    best = {"tiny-sd2": {"layer": "up_blocks.1", "timestep": 261, "transform": "raw"},
            "tiny-sd3": {"layer": "transformer_blocks.3", "timestep": 261, "transform": "raw"}}
    explorer = Explorer(list(demo_stores["stores"].values()), pairs, demo_stores["images"], demo_stores["root"],
                        transforms={"tiny-sd3": ["raw", "drop:auto+adaln"]}, predictions=predictions, best=best)
    return explorer, {name: pd.read_parquet(path) for name, path in predictions.items()}


def cross_pair(pairs: pd.DataFrame, index: int = 4) -> pd.Series:
    return pairs[pairs["src_image"] != pairs["trg_image"]].iloc[index]


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


def test_server_answers_over_http(explored, demo_stores):
    from pipeline.explorer.server import Background

    explorer, tables = explored
    server = Background(explorer)
    try:
        def call(path, body=None):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
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
            call("api/click", {"pair": "nope", "variants": [vars(SD2)]})
        assert failed.value.code == 400 and json.loads(failed.value.read())["error"].startswith("pair: no pair named")
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run does)")
def test_in_a_real_browser(explored, demo_stores, tmp_path):
    """Headless Chromium: pick a pair, click a keypoint, wait for the maps; the predicted point drawn on each
    map is `match`'s prediction for that pair and keypoint."""
    from playwright.sync_api import sync_playwright

    from pipeline.explorer.server import Background

    explorer, tables = explored
    pair, keypoint = cross_pair(demo_stores["pairs"], 6), 2
    server = Background(explorer)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url)
            page.wait_for_selector(f"#pair option[value='{pair['filename']}']", state="attached")
            # Add a second layer and a transform of tiny-sd3 to its default (best) variant.
            page.click(".chip[data-store='tiny-sd3'][data-value='transformer_blocks.1']")
            page.click(".chip[data-store='tiny-sd3'][data-value='drop:auto+adaln']")
            page.select_option("#pair", pair["filename"])
            page.click(f".keypoint[data-keypoint='{keypoint}']")
            page.wait_for_function(f"document.getElementById('status').dataset.query === '{{\"keypoint\":{keypoint}}}'")
            page.wait_for_selector(".hit")  # the dataset-wide search answered too
            shown = page.eval_on_selector_all(".card", """cards => cards.map(c => ({
                store: c.dataset.store, layer: c.dataset.layer, transform: c.dataset.transform,
                x: Number(c.querySelector('.marker.pred').dataset.x), y: Number(c.querySelector('.marker.pred').dataset.y),
                text: c.querySelector('.predicted').textContent}))""")
            page.screenshot(path=tmp_path / "explorer.png", full_page=True)
            browser.close()
    finally:
        server.stop()
    sd3 = [card for card in shown if card["store"] == "tiny-sd3"]
    assert {(c["layer"], c["transform"]) for c in sd3} == {(layer, spec) for layer in ("transformer_blocks.1", "transformer_blocks.3")
                                                           for spec in ("raw", "drop:auto+adaln")}
    assert len(shown) == len(explorer.maps) + 3
    for card in shown:
        if card["store"] not in tables:
            continue
        table = tables[card["store"]]
        row = table[(table["pair"] == pair["filename"]) & (table["layer"] == card["layer"]) & (table["protocol"] == "dift")
                    & (table["transform"] == card["transform"])].iloc[keypoint]
        assert (card["x"], card["y"]) == (row["pred_x"], row["pred_y"]), card
        assert card["text"] == f"({int(row['pred_x'])}, {int(row['pred_y'])})"
    print(f"screenshot: {tmp_path / 'explorer.png'}")


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
