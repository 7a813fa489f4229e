"""The explorer's page in a real browser (headless Chromium through Playwright): the comparison view, one row
per store, and what it draws checked against `match`'s predictions tables and the `Explorer`'s answers."""

import json
import shutil

import pytest

from conftest import cross_pair
from pipeline.matching.maps import Variant

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run does)")]

CARDS = """cards => cards.map(c => {
    // an element's own text, not its <title>'s
    const own = e => e ? [...e.childNodes].filter(n => n.nodeType === 3).map(n => n.nodeValue).join('') : null;
    const box = c.getBoundingClientRect(), pred = c.querySelector('.marker.pred'), hist = c.querySelector('.histogram');
    return {store: c.dataset.store, layer: c.dataset.layer, timestep: Number(c.dataset.timestep),
            transform: c.dataset.transform, row: Number(c.dataset.row), column: Number(c.dataset.column),
            left: Math.round(box.left), top: Math.round(box.top), width: Math.round(box.width),
            label: c.querySelector('.label').getBoundingClientRect().height,
            x: Number(pred.dataset.x), y: Number(pred.dataset.y), text: c.querySelector('.predicted').textContent,
            yLabel: own(hist.querySelector('.y-label')), yTicks: [...hist.querySelectorAll('.y-tick')].map(own),
            marks: Object.fromEntries([...hist.querySelectorAll('.mark')]
                                      .map(m => [m.classList[1], Number(m.dataset.value)]))};
})"""


def wait_query(page, what: dict):
    """Until the page has drawn the answer to `what` (the status's `data-query`: JSON.stringify of it)."""
    expected = json.dumps(json.dumps(what, separators=(",", ":")))
    page.wait_for_function(f"document.getElementById('status').dataset.query === {expected}")


def hits(page) -> list[tuple]:
    return page.eval_on_selector_all("#search-results .hit",
                                     "hs => hs.map(h => [h.dataset.image, Number(h.dataset.x), Number(h.dataset.y)])")


def test_comparison_view_in_a_real_browser(explored, demo_stores, tmp_path):
    """Two stores (a row each), two layers each (a column each): every predicted point drawn is `match`'s
    prediction for that pair, keypoint and variant; the histograms have a count axis and marks; chip clicks are
    debounced; the search panel follows the latest query only; one-sided right/wrong filters and unknown image
    keys are handled on the page."""
    from playwright.sync_api import sync_playwright

    from pipeline.explorer.server import Background

    explorer, tables = explored
    pairs = demo_stores["pairs"]
    pair, keypoint = cross_pair(pairs, 6), 2
    name = pair["filename"]
    layers = {"tiny-sd2": ["up_blocks.1", "up_blocks.2"], "tiny-sd3": ["transformer_blocks.1", "transformer_blocks.3"]}
    assert explorer.compare == ["tiny-sd2", "tiny-sd3"]
    server = Background(explorer)
    requests, errors, held = [], [], []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append((r.method, r.url, r.post_data)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector(f"#pair option[value='{name}']", state="attached")
            ticked = page.eval_on_selector_all("#variants input[type=checkbox]",
                                               "cs => Object.fromEntries(cs.map(c => [c.dataset.store, c.checked]))")
            assert ticked == {store: store in ("tiny-sd2", "tiny-sd3") for store in explorer.maps}
            # Each store starts at its best variant (one layer); add the other layer of each.
            page.click(".chip[data-store='tiny-sd2'][data-value='up_blocks.2']")
            page.click(".chip[data-store='tiny-sd3'][data-value='transformer_blocks.1']")
            page.select_option("#pair", name)
            page.click(f".keypoint[data-keypoint='{keypoint}']")
            wait_query(page, {"keypoint": keypoint})
            page.wait_for_selector(".hit")  # the dataset-wide search answered too
            heads = page.eval_on_selector_all("#maps .row-head", "hs => hs.map(h => [Number(h.dataset.row), h.dataset.store])")
            cards = page.eval_on_selector_all("#maps .card", CARDS)
            legend = page.text_content("#legend")
            target = page.text_content("#target-title")
            sticky = page.eval_on_selector("#source-panel", "e => getComputedStyle(e).position")
            page.screenshot(path=tmp_path / "explorer.png", full_page=True)

            # Three quick chip clicks (in one task: Playwright's own clicks may be further apart than the
            # debounce on a loaded machine) make one query, with the final choice.
            drawn, before = page.get_attribute("#status", "data-drawn"), len(requests)
            page.evaluate("""() => [['tiny-sd2', 'up_blocks.2'], ['tiny-sd3', 'drop:auto+adaln'],
                                    ['tiny-sd3', 'drop:auto+adaln']]
                .forEach(([s, v]) => document.querySelector(`.chip[data-store='${s}'][data-value='${v}']`).click())""")
            page.wait_for_function(f"document.getElementById('status').dataset.drawn !== '{drawn}'")
            page.wait_for_timeout(700)
            clicks = [json.loads(body) for method, url, body in requests[before:] if url.endswith("/api/click")]
            after = page.eval_on_selector_all(
                "#maps .card", "cs => cs.map(c => [Number(c.dataset.row), Number(c.dataset.column), c.dataset.layer])")

            # The search panel belongs to the latest query: cleared when a query starts; an older query's
            # answer, held back until a newer one is drawn, is dropped.
            def hold_first(route):
                (held.append(route) if not held else route.continue_())

            page.route("**/api/search", hold_first)
            cleared = page.evaluate("""() => { document.querySelector(".keypoint[data-keypoint='0']").click();
                                              return document.querySelectorAll('#search-results .hit').length; }""")
            wait_query(page, {"keypoint": 0})
            page.wait_for_function("() => document.querySelector('#search-results').textContent.includes('searching')")
            page.click(".keypoint[data-keypoint='1']")
            wait_query(page, {"keypoint": 1})
            page.wait_for_selector(".hit")
            newer = hits(page)
            held[0].continue_()
            page.wait_for_timeout(700)
            still = hits(page)
            page.unroute("**/api/search")

            # Only "right" chosen: no right/wrong filter is asked for, the list stays, a hint says why.
            before = len(requests)
            page.select_option("#right", "tiny-sd3")
            page.wait_for_function("document.getElementById('right-wrong-hint').textContent.includes('wrong')")
            page.wait_for_selector("#pair[data-state='ready']", state="attached")
            one_sided = [url for _, url, _ in requests[before:] if "/api/pairs" in url]
            listed = page.eval_on_selector_all("#pair option", "os => os.length")
            page.select_option("#wrong", "tiny-sd2")
            page.wait_for_selector("#pair option[data-disagreements]", state="attached")
            both = [url for _, url, _ in requests[before:] if "/api/pairs" in url and "right=" in url]
            page.select_option("#right", "")
            page.select_option("#wrong", "")
            page.wait_for_selector("#pair[data-state='ready']", state="attached")

            # Any two images: an unknown key is a one-line error; known ones show the target's name, and a
            # click on the source's last pixel asks for a point inside it.
            page.click("#two-images summary")
            page.fill("#src-image", pair["src_image"])
            page.fill("#trg-image", "nope/unknown")
            page.click("#use-images")
            page.wait_for_function("document.getElementById('status').dataset.state === 'error'")
            unknown = page.text_content("#status")
            page.fill("#trg-image", pair["trg_image"])
            page.click("#use-images")
            free_target = page.text_content("#target-title")
            box = page.eval_on_selector("#source", "e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; }")
            page.click("#source-frame", position={"x": box[0] - 0.5, "y": box[1] - 0.5})
            page.wait_for_function("(document.getElementById('status').dataset.query || '').includes('\"x\"')")
            corner = json.loads(page.get_attribute("#status", "data-query"))
            free_rows = page.eval_on_selector_all("#maps .row-head", "hs => hs.map(h => h.dataset.store)")
            browser.close()
    finally:
        server.stop()

    # The grid: a row per store in order, a column per layer, laid out as a grid of equal cards.
    assert heads == [[0, "tiny-sd2"], [1, "tiny-sd3"]]
    assert {(c["row"], c["column"]): (c["store"], c["layer"]) for c in cards} == {
        (row, column): (store, layer) for row, (store, chosen) in enumerate(layers.items())
        for column, layer in enumerate(chosen)} and len(cards) == 4
    where = {(c["row"], c["column"]): c for c in cards}
    assert where[0, 0]["top"] == where[0, 1]["top"] < where[1, 0]["top"] == where[1, 1]["top"]
    assert where[0, 0]["left"] == where[1, 0]["left"] < where[0, 1]["left"] == where[1, 1]["left"]
    assert len({c["width"] for c in cards}) == 1 and len({c["label"] for c in cards}) == 1  # no uneven wraps
    assert sticky == "sticky"
    for text in ("query point", "predicted point", "true keypoint"):
        assert text in legend
    assert target == f"target: {pair['trg_image']}"
    # Every prediction drawn is `match`'s; the histogram's marks and axis are the click's answer.
    answer = explorer.click([Variant(c["store"], c["layer"], c["timestep"], c["transform"]) for c in cards], None,
                            pair=name, keypoint=keypoint)["maps"]
    for card, shown in zip(cards, answer):
        table = tables[card["store"]]
        rows = table[(table["pair"] == name) & (table["layer"] == card["layer"]) & (table["protocol"] == "dift")
                     & (table["timestep"] == card["timestep"]) & (table["transform"] == card["transform"])]
        row = rows[rows["keypoint"].astype(str) == str(pair["kps_ids"][keypoint])].iloc[0]
        assert (card["x"], card["y"]) == (row["pred_x"], row["pred_y"]), card
        assert card["text"] == f"({int(row['pred_x'])}, {int(row['pred_y'])})"
        assert card["yLabel"] == "pixels" and card["yTicks"][-1] == str(max(shown["histogram"]["counts"]))
        assert card["marks"]["max"] == pytest.approx(shown["sharpness"]["sim_max"])
        assert card["marks"]["pred"] == pytest.approx(shown["at_predicted"])
        assert card["marks"]["true"] == pytest.approx(shown["at_true"])
    # Debounced: one click request for three chip clicks, asking for the final choice.
    assert len(clicks) == 1
    assert [(v["store"], v["layer"], v["transform"]) for v in clicks[0]["variants"]] == [
        ("tiny-sd2", "up_blocks.1", "raw"), ("tiny-sd3", "transformer_blocks.1", "raw"), ("tiny-sd3", "transformer_blocks.3", "raw")]
    assert after == [[0, 0, "up_blocks.1"], [1, 0, "transformer_blocks.1"], [1, 1, "transformer_blocks.3"]]
    # The search panel: emptied at once, then keypoint 1's neighbours, which keypoint 0's late answer leaves be.
    assert cleared == 0 and len(held) == 1
    search_variant = Variant("tiny-sd2", "up_blocks.1", 261, "raw")
    expected = [[h["image"], h["x"], h["y"]] for h in explorer.search(search_variant, pair["src_image"],
                                                                       pair["src_kps"][1], 20)]
    stale = [[h["image"], h["x"], h["y"]] for h in explorer.search(search_variant, pair["src_image"], pair["src_kps"][0], 20)]
    assert newer == still == expected != stale
    # One-sided right/wrong: no request names either, the list stays; both: the filter is asked for.
    assert one_sided and not any("right=" in url or "wrong=" in url for url in one_sided)
    assert listed == min(len(pairs), 500) and both
    # Any two images.
    assert "nope/unknown" in unknown and "\n" not in unknown
    assert free_target == f"target: {pair['trg_image']}"
    assert 0 <= corner["x"] < pair["src_width"] and 0 <= corner["y"] < pair["src_height"]
    assert corner["x"] >= pair["src_width"] - 2 and corner["y"] >= pair["src_height"] - 2
    assert free_rows == ["tiny-sd2", "tiny-sd3"]
    assert errors == []
    print(f"screenshot: {tmp_path / 'explorer.png'}")


def test_at_most_the_limit_of_maps(explored, demo_stores):
    """More maps than the server's limit: the page says so and asks nothing."""
    from playwright.sync_api import sync_playwright

    from pipeline.explorer.server import Background

    explorer, _ = explored
    pair = cross_pair(demo_stores["pairs"], 6)
    server = Background(explorer)
    requests, errors = [], []

    def small_limit(route):
        response = route.fetch()
        catalogue = response.json()
        catalogue["limits"]["maps"] = 2
        route.fulfill(response=response, json=catalogue)

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/api/catalogue", small_limit)
            page.goto(server.url)
            page.wait_for_selector(f"#pair option[value='{pair['filename']}']", state="attached")
            page.click(".chip[data-store='tiny-sd3'][data-value='transformer_blocks.1']")
            page.select_option("#pair", pair["filename"])
            page.click(".keypoint[data-keypoint='0']")
            page.wait_for_function("document.getElementById('status').dataset.state === 'error'")
            status, count = page.text_content("#status"), page.text_content("#variant-count")
            page.wait_for_timeout(400)
            browser.close()
    finally:
        server.stop()
    assert status == "3 maps: at most 2, untick some" and "at most 2" in count
    assert not any(url.endswith("/api/click") for url in requests) and errors == []


def test_without_its_cookie_the_page_sends_its_urls_token(explored, demo_stores):
    """In a notebook's IFrame the browser may withhold the server's cookie: the page then authorises its
    requests and images with the token of its own URL."""
    from playwright.sync_api import sync_playwright

    from pipeline.explorer.server import Background

    explorer, _ = explored
    pair = cross_pair(demo_stores["pairs"], 6)
    server = Background(explorer)
    errors = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector(f"#pair option[value='{pair['filename']}']", state="attached")
            page.context.clear_cookies()
            page.select_option("#pair", pair["filename"])
            page.click(".keypoint[data-keypoint='0']")
            wait_query(page, {"keypoint": 0})
            page.wait_for_selector(".hit")
            page.wait_for_function("[...document.querySelectorAll('#source, #maps .card img:not(.overlay)')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            cookies, state = page.context.cookies(), page.get_attribute("#status", "data-state")
            browser.close()
    finally:
        server.stop()
    assert "token=" in server.url and cookies == [] and state == "ready" and errors == []
