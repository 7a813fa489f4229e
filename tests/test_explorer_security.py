"""The explorer's server: only its user drives it, every request is bounded, every bad one is a one-line 4xx
(issue 27). Requests go over real HTTP to a server in this process (`Background`)."""

import http.client
import json
import shutil
import socket

import pandas as pd
import pytest

from conftest import EXPLORED_SD2 as SD2, EXPLORED_SD3 as SD3, cross_pair
from pipeline.explorer.explorer import MAX_MAPS, Explorer
from pipeline.explorer.server import MAX_BODY_BYTES, MAX_MESSAGE, Background


@pytest.fixture(scope="module")
def server(explored):
    running = Background(explored[0])
    yield running
    running.stop()


def send(server, method, path, body=None, *, token=True, host=None, origin=None, content_type="application/json",
         headers=None, length=None):
    """(status, parsed JSON or raw bytes) of one request, every header under the test's control."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if host is not False:  # False: no Host header at all
        connection.putheader("Host", f"127.0.0.1:{server.port}" if host is None else host)
    if token:
        connection.putheader("Authorization", f"token {server.token}")
    if origin:
        connection.putheader("Origin", origin)
    if data is not None:
        connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(data) if length is None else length))
    for key, value in (headers or {}).items():
        connection.putheader(key, value)
    connection.endheaders()
    if data is not None and length is None:
        connection.send(data)
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


def one_line(answer) -> str:
    message = answer["error"]
    assert "\n" not in message and len(message) <= MAX_MESSAGE and "Traceback" not in message, message
    return message


def click_body(pair, **extra):
    return {"pair": pair, "keypoint": 0, "variants": [vars(SD2)], **extra}


def test_only_the_token_holder_on_this_host_and_origin_drives_it(server, demo_stores):
    pair = cross_pair(demo_stores["pairs"])["filename"]
    status, answer = send(server, "POST", "/api/click", click_body(pair))
    assert status == 200 and answer["maps"][0]["variant"] == vars(SD2)
    refused = {
        "no token": dict(token=False),
        "a wrong token": dict(token=False, headers={"Authorization": "token " + "x" * 32}),
        "a foreign Host (DNS rebinding)": dict(host="attacker.example"),
        "a foreign Host on our port": dict(host=f"attacker.example:{server.port}"),
        "a foreign Origin": dict(origin="http://evil.example"),
        "an Origin on another port": dict(origin=f"http://127.0.0.1:{server.port + 1}"),
        "a null Origin": dict(origin="null"),
        "a cross-site fetch": dict(headers={"Sec-Fetch-Site": "cross-site"}),
    }
    for why, how in refused.items():
        status, answer = send(server, "POST", "/api/click", click_body(pair), **how)
        assert status == 403, why
        one_line(answer)
    status, answer = send(server, "POST", "/api/click", click_body(pair), content_type="text/plain")
    assert status == 415 and "application/json" in one_line(answer)
    for form in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert send(server, "POST", "/api/click", click_body(pair), content_type=form)[0] == 415
    # Reads need the token too (the catalogue names every image), and a foreign Host cannot read them.
    assert send(server, "GET", "/api/catalogue", token=False)[0] == 403
    assert send(server, "GET", "/api/catalogue", host="attacker.example")[0] == 403
    assert send(server, "GET", "/", token=False)[0] == 403
    # The page's code holds no data: it loads without the token (in a notebook's IFrame the browser withholds the
    # cookie; the page then sends its URL's token), but not under a foreign Host.
    assert send(server, "GET", "/page/explorer.js", token=False)[0] == 200
    assert send(server, "GET", "/page/explorer.js", token=False, host="attacker.example")[0] == 403
    assert send(server, "GET", "/image?key=" + cross_pair(demo_stores["pairs"])["src_image"], token=False)[0] == 403
    # No way around the token: HEAD, a path that climbs out of /page/, a doubled slash; nor around the Host
    # check: none at all (HTTP/1.1's parser refuses it first), empty, or a name that only starts like ours.
    assert send(server, "HEAD", "/api/catalogue", token=False)[0] == 403
    assert send(server, "GET", "/page/../api/catalogue", token=False)[0] in (403, 404)
    assert send(server, "GET", "/page/%2e%2e/api/catalogue", token=False)[0] in (403, 404)
    assert send(server, "GET", "//api/catalogue", token=False)[0] in (403, 404)
    for host in (False, "", "[::1]evil.example:1", "127.0.0.1@evil.example", "localhost.evil.example"):
        assert send(server, "GET", "/api/catalogue", host=host)[0] in ((400, 403) if host is False else (403,)), host
    # Local names of this server pass; the same origin passes.
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", f"127.0.0.1:{server.port}"):
        assert send(server, "GET", "/api/catalogue", host=host)[0] == 200, host
    assert send(server, "POST", "/api/click", click_body(pair), origin=f"http://127.0.0.1:{server.port}")[0] == 200


def test_the_printed_url_sets_a_same_site_cookie_that_authorises_the_page(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("GET", "/?" + server.url.split("?", 1)[1])
    response = connection.getresponse()
    response.read()
    cookie = response.getheader("set-cookie")
    assert response.status == 200 and server.token in cookie
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    status, catalogue = send(server, "GET", "/api/catalogue", token=False, headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and catalogue["compare"] == ["tiny-sd2", "tiny-sd3"]


def test_every_malformed_request_is_a_one_line_4xx_that_does_not_echo_it(server, demo_stores):
    pair = cross_pair(demo_stores["pairs"])
    name, src, trg = pair["filename"], pair["src_image"], pair["trg_image"]
    long = "drop:" + ",".join(["1"] * 200)  # 400 characters
    v = vars(SD2)
    catalogue = [
        # (method, path, body, status, the message starts with)
        ("GET", "/image", None, 400, "key: Field required"),
        ("GET", "/image?key=nope/none", None, 404, "image: no image 'nope/none'"),
        ("GET", "/api/pair", None, 400, "name: Field required"),
        ("GET", "/api/pair?name=" + "n" * 300, None, 400, "name: String should have at most 255"),
        ("GET", "/api/pair?name=nope", None, 400, "pair: no pair named 'nope'"),
        ("GET", "/api/pairs?flag=mirror&value=abc", None, 400, "value: Input should be a valid integer"),
        ("GET", "/api/pairs?flag=nope", None, 400, "flag: unknown flag 'nope'"),
        ("GET", "/api/pairs?right=tiny-sd3", None, 400, "wrong: choose both"),
        ("GET", "/api/pairs?wrong=tiny-sd3", None, 400, "right: choose both"),
        ("GET", "/api/pairs?category=a&category=b", None, 400, "a query parameter given twice"),
        ("GET", "/api/pairs?colour=red", None, 400, "colour: Extra inputs are not permitted"),
        ("POST", "/api/click", b"[1, 2]", 400, "body: Input should be an object"),
        ("POST", "/api/click", b"{not json", 400, "body: Invalid JSON"),
        ("POST", "/api/click", b"", 400, "body: Invalid JSON"),
        ("POST", "/api/click", {"pair": name, "keypoint": 0}, 400, "variants: Field required"),
        ("POST", "/api/click", {"pair": name, "keypoint": 0, "variants": []}, 400, "variants: List should have at least 1"),
        ("POST", "/api/click", {"pair": name, "keypoint": 0, "variants": [v] * (MAX_MAPS + 1)}, 400,
         f"variants: List should have at most {MAX_MAPS}"),
        ("POST", "/api/click", {"pair": name, "keypoint": 0, "variants": "all"}, 400, "variants: Input should be a valid array"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "timestep": "x"}]), 400,
         "variants.0.timestep: Input should be a valid integer"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "timestep": 261.5}]), 400, "variants.0.timestep:"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "store": None}]), 400, "variants.0.store:"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "colour": 1}]), 400, "variants.0.colour: Extra inputs"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "transform": long}]), 400,
         "variants.0.transform: String should have at most 255"),
        ("POST", "/api/click", click_body(name, keypoint=1.5), 400, "keypoint: Input should be a valid integer"),
        ("POST", "/api/click", click_body(name, keypoint=-1), 400, "keypoint: Input should be greater than or equal to 0"),
        ("POST", "/api/click", click_body(name, keypoint=99), 400, "keypoint: no keypoint 99"),
        ("POST", "/api/click", b'{"pair": "%s", "x": Infinity, "y": 3, "variants": [%s]}' % (name.encode(), json.dumps(v).encode()),
         400, "x:"),
        ("POST", "/api/click", b'{"pair": "%s", "x": NaN, "y": 3, "variants": [%s]}' % (name.encode(), json.dumps(v).encode()),
         400, "x:"),
        ("POST", "/api/click", {"pair": name, "x": 5, "variants": [v]}, 400, "body: give `keypoint`, or `x` and `y`"),
        ("POST", "/api/click", {"keypoint": 0, "variants": [v]}, 400, "body: give `pair`, or `src` and `trg`"),
        ("POST", "/api/click", {"pair": name, "x": 100000, "y": 3, "variants": [v]}, 400, "point: (100000, 3) is outside"),
        ("POST", "/api/click", {"src": src, "trg": "nope/none", "x": 1, "y": 1, "variants": [v]}, 400, "image: no image"),
        ("POST", "/api/click", click_body(name, variants=[{**vars(SD3[0]), "transform": "layernorm"}]), 400,
         "transform: 'layernorm' is not configured for 'tiny-sd3'"),
        ("POST", "/api/click", click_body(name, variants=[{**vars(SD3[0]), "transform": "drop:-1"}]), 400,
         "transform: 'drop:-1' is not configured"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "store": "sd9"}]), 400, "store: no store named 'sd9'"),
        ("POST", "/api/click", click_body(name, variants=[{**v, "layer": "down"}]), 400, ""),
        ("POST", "/api/click", click_body(name, variants=[{**v, "timestep": 7}]), 400, ""),
        ("POST", "/api/warm", {"variants": [v]}, 400, "body: give `pair`, or `trg`"),
        ("POST", "/api/search", {"variant": v, "image": src, "x": 1, "y": 1, "top": -1}, 400, "top: Input should be greater"),
        ("POST", "/api/search", {"variant": v, "image": src, "x": 1, "y": 1, "top": 0}, 400, "top: Input should be greater"),
        ("POST", "/api/search", {"variant": v, "image": src, "x": 1, "y": 1, "top": "abc"}, 400, "top: Input should be a valid integer"),
        ("POST", "/api/search", {"variant": v, "image": src, "x": 1, "y": 1, "top": 10 ** 9}, 400, "top: Input should be less than or equal to 100"),
        ("POST", "/api/search", b'{"variant": %s, "image": "%s", "x": NaN, "y": 1}' % (json.dumps(v).encode(), src.encode()), 400, "x:"),
        ("POST", "/api/search", {"variant": v, "image": src, "x": 1e6, "y": 1}, 400, "point: (1e+06, 1) is not inside"),
        ("POST", "/api/search", {"variant": {**v, "transform": "drop:1"}, "image": src, "x": 1, "y": 1}, 400,
         "transform: 'drop:1' is not configured"),
        ("GET", "/api/click", None, 405, None),
        ("GET", "/api/nothing", None, 404, None),
    ]
    named = "x" * 180  # within the 255 a name may have: quoted back clipped
    catalogue += [("GET", f"/api/pair?name={named}", None, 400, f"pair: no pair named '{'x' * 40}…'"),
                  ("GET", f"/image?key={named}", None, 404, f"image: no image '{'x' * 40}…'"),
                  ("POST", "/api/click", click_body(name, variants=[{**v, "store": named}]), 400,
                   f"store: no store named '{'x' * 40}…'"),
                  ("POST", "/api/click", {**click_body(name), named: 1}, 400, f"{'x' * 40}…: Extra inputs")]
    for method, path, body, status, starts in catalogue:
        got, answer = send(server, method, path, body)
        assert got == status, (path, body if not isinstance(body, bytes) else body[:80], got, answer)
        if starts is not None:
            message = one_line(answer)
            assert message.startswith(starts), (path, message)
            assert long not in message and "n" * 100 not in message and "x" * 41 not in message


def test_bodies_are_bounded_before_they_are_read(server, demo_stores):
    pair = cross_pair(demo_stores["pairs"])["filename"]
    # A 30 MB body is refused on its Content-Length, without sending it; one without a length too.
    status, answer = send(server, "POST", "/api/click", click_body(pair), length=30 << 20)
    assert status == 413 and one_line(answer) == f"request body over {MAX_BODY_BYTES // 1024} KiB"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/api/click", body=iter([json.dumps(click_body(pair)).encode()]),
                       headers={"Content-Type": "application/json", "Authorization": f"token {server.token}"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 411 and one_line(json.loads(response.read())).startswith("a Content-Length is required")
    connection.close()
    # A chunked body under a small Content-Length: HTTP/1.1 reads the chunks, whatever the length says.
    status, answer = send(server, "POST", "/api/click", b"", headers={"Transfer-Encoding": "chunked"}, length=100)
    assert status == 411 and "no Transfer-Encoding" in one_line(answer)


def test_only_configured_transforms_build_search_indexes(explored, demo_stores, tmp_path, monkeypatch):
    """100 spellings of transforms: each refused in one line, none writes an index; the configured one
    builds exactly its own, in the user's cache, nothing beside the store."""
    monkeypatch.setenv("DIFT_CACHE_DIR", str(tmp_path))
    explorer = explored[0]
    fresh = Explorer([demo_stores["stores"]["tiny-sd3"]], explorer.pairs.reset_index(drop=True), demo_stores["images"],
                     demo_stores["root"], transforms={"tiny-sd3": ["raw", "drop:auto+adaln"]})
    server = Background(fresh)
    try:
        _spellings(server, demo_stores, tmp_path)
    finally:
        server.stop()


def _spellings(server, demo_stores, tmp_path):
    src = cross_pair(demo_stores["pairs"])["src_image"]
    base = vars(SD3[0])
    spellings = ([f"drop:{'0' * zeros}1" for zeros in range(30)] + [f"drop:-{c}" for c in range(1, 21)]
                 + [f"drop:{c}" for c in range(2, 22)] + ["layernorm", "adaln", "drop:auto", "raw+raw", " raw", "raw ",
                                                        "drop:auto+layernorm", "drop:1,1", "drop:2,1", "layernorm+adaln"]
                 + [f"drop:{c},{c + 1}" for c in range(20)])
    assert len(set(spellings)) == 100
    for spec in spellings:
        status, answer = send(server, "POST", "/api/search", {"variant": {**base, "transform": spec}, "image": src,
                                                               "x": 3, "y": 4, "top": 5})
        assert status == 400 and one_line(answer).startswith("transform: "), spec
    assert not list(tmp_path.rglob("*.faiss"))
    for spec in ("raw", "drop:auto+adaln"):
        status, hits = send(server, "POST", "/api/search", {"variant": {**base, "transform": spec}, "image": src,
                                                             "x": 3, "y": 4, "top": 5})
        assert status == 200 and len(hits) == 5 and hits[0]["image"] == src
    assert sorted(p.name for p in tmp_path.rglob("*.faiss")) == [f"{base['layer']}@261@drop-auto_adaln.faiss",
                                                                 f"{base['layer']}@261@raw.faiss"]
    assert not list(demo_stores["stores"]["tiny-sd3"].parent.glob("*.search"))


def test_a_store_removed_while_serving_says_so(explored, demo_stores, tmp_path):
    explorer, _ = explored
    copy = shutil.copytree(demo_stores["stores"]["tiny-sd2"], tmp_path / "sd2.zarr")
    images = demo_stores["images"]
    extra = images.iloc[[0]].assign(image="star/not_in_the_store")  # in the split's table, not in the store
    mine = Explorer([copy], explorer.pairs.reset_index(drop=True), pd.concat([images, extra]), demo_stores["root"])
    running = Background(mine)
    try:
        pair = cross_pair(demo_stores["pairs"])["filename"]
        assert send(running, "POST", "/api/click", click_body(pair))[0] == 200
        for src, trg in (("star/not_in_the_store", images["image"].iloc[1]), (images["image"].iloc[1], "star/not_in_the_store")):
            status, answer = send(running, "POST", "/api/click", {"src": src, "trg": trg, "x": 1, "y": 1,
                                                                   "variants": [vars(SD2)]})
            assert status == 400 and one_line(answer) == (f"{copy}: image: store has no image 'star/not_in_the_store' "
                                                          "(built for another split?)")
        copy.rename(tmp_path / "moved.zarr")
        status, answer = send(running, "POST", "/api/click", click_body(pair, x=3, y=4, keypoint=None))
        assert status == 400 and one_line(answer) == f"{copy}: store missing (moved or deleted while the explorer runs)"
    finally:
        running.stop()


def test_a_restart_binds_the_same_port_while_a_tab_holds_a_connection(explored):
    """The browser keeps its connection open; stopping the server leaves it in TIME_WAIT on the server's side,
    which a socket without SO_REUSEADDR cannot bind over."""
    first = Background(explored[0])
    tab = http.client.HTTPConnection("127.0.0.1", first.port, timeout=30)
    tab.request("GET", "/api/catalogue", headers={"Authorization": f"token {first.token}"})
    assert tab.getresponse().read() and True
    port = first.port
    first.stop()
    second = Background(explored[0], port=port)
    try:
        assert second.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        tab.close()
        second.stop()


def test_without_a_token_it_serves_anyone_local_but_still_checks_host_and_origin(explored, demo_stores):
    running = Background(explored[0], token=None)
    try:
        assert "token" not in running.url
        assert send(running, "GET", "/api/catalogue", token=False)[0] == 200
        assert send(running, "GET", "/api/catalogue", token=False, host="attacker.example")[0] == 403
        pair = cross_pair(demo_stores["pairs"])["filename"]
        assert send(running, "POST", "/api/click", click_body(pair), token=False, origin="http://evil.example")[0] == 403
    finally:
        running.stop()


def test_the_command_prints_a_url_with_its_token_and_says_what_another_host_exposes(demo_stores, tmp_path):
    """`cli.py explore --host 0.0.0.0` as a user starts it: the printed URL (with its token) opens the page, a
    request without the token is refused, and stderr says what listening on every interface exposes."""
    import os
    import re
    import subprocess
    import sys
    import time

    from conftest import REPO, demo_project

    project = demo_project(demo_stores, tmp_path)
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "explore", "--store",
                                str(demo_stores["stores"]["tiny-sd2"]), "--port", "0", "--host", "0.0.0.0"],
                               cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = process.stdout.readline()
        found = re.fullmatch(r"explorer: http://127\.0\.0\.1:(\d+)/\?token=([\w-]{32})  \(Ctrl\+C stops it\)\n", line)
        assert found, line
        port, token = int(found.group(1)), found.group(2)
        running = type("Running", (), {"port": port, "token": token})
        deadline = time.monotonic() + 60
        while True:
            try:
                status, catalogue = send(running, "GET", "/api/catalogue", host=f"192.0.2.7:{port}")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 200 and [s["name"] for s in catalogue["stores"]] == ["tiny-sd2"]
        assert send(running, "GET", "/api/catalogue", token=False)[0] == 403
        # Any address reaches it (an address cannot be rebound), and this machine's name; no other name.
        assert send(running, "GET", "/api/catalogue", host=f"{socket.gethostname()}:{port}")[0] == 200
        assert send(running, "GET", "/api/catalogue", host=f"rebound.example:{port}")[0] == 403
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert (f"explorer: listening on 0.0.0.0: anyone who can reach this machine on port {port} and has the token "
            "can read the stores and the dataset's images") in err


def test_no_token_only_on_the_loopback(explored):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no-token: serving 0.0.0.0 without a token would let anyone"):
        Background(explored[0], host="0.0.0.0", token=None)
