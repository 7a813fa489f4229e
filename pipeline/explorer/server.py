"""The explorer's web server: a small ASGI app (Starlette, served by uvicorn) over an `Explorer`, and the
static page in `page/`.

Only its user drives it, as Jupyter's server: every request carries the random token of the URL the command
prints (the page keeps it in a same-site cookie), names this server in its Host header (a DNS-rebinding
page names another), and a state-changing request comes from the page's own origin as JSON (a form or
`text/plain` post from another site is refused). It listens on 127.0.0.1 unless told otherwise.

Every request is bounded (body size, maps per click, cells per search, the transforms the store's params
configure) and every bad one is a one-line 4xx that does not echo its input. Work runs in a thread pool,
one request at a time (the caches are shared), so a click never waits behind the page's image downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import torch
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.errors import PipelineError, as_expected
from pipeline.explorer.explorer import MAX_MAPS, MAX_TOP, Explorer
from pipeline.matching.maps import Variant

PAGE = Path(__file__).with_name("page")
MAX_BODY_BYTES = 64 << 10  # a click of MAX_MAPS variants is ~3 KB
MAX_MESSAGE = 200  # characters of an error's line: enough to name the field and why, never the whole input
MAX_QUOTED = 40  # characters of a name the request sent, quoted back in an error
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


# ---- requests: what each route accepts, checked before any work ---------------------------------------------
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Index = Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class VariantBody(_Body):
    store: Name
    layer: Name
    timestep: int
    transform: Name = "raw"

    def variant(self) -> Variant:
        return Variant(self.store, self.layer, self.timestep, self.transform)


class _Images(_Body):
    pair: Name | None = None
    src: Name | None = None
    trg: Name | None = None


class WarmBody(_Images):
    variants: Annotated[list[VariantBody], Field(min_length=1, max_length=MAX_MAPS)]

    @model_validator(mode="after")
    def _target(self):
        if not (self.pair or self.trg):
            raise ValueError("give `pair`, or `trg`")
        return self


class ClickBody(_Images):
    variants: Annotated[list[VariantBody], Field(min_length=1, max_length=MAX_MAPS)]
    keypoint: Index | None = None
    x: Index | None = None
    y: Index | None = None

    @model_validator(mode="after")
    def _what(self):
        if not (self.pair or (self.src and self.trg)):
            raise ValueError("give `pair`, or `src` and `trg`")
        if self.keypoint is None and (self.x is None or self.y is None):
            raise ValueError("give `keypoint`, or `x` and `y`")
        return self


class SearchBody(_Body):
    variant: VariantBody
    image: Name
    x: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    y: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    top: Annotated[int, Field(ge=1, le=MAX_TOP)] = 20


class PairsQuery(_Body):
    model_config = ConfigDict(extra="forbid", frozen=True)  # query strings: "3" is 3
    category: Name | None = None
    flag: Name | None = None
    value: int | None = None
    right: Name | None = None
    wrong: Name | None = None


class NameQuery(_Body):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name


class KeyQuery(_Body):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: Name


class Refused(Exception):
    """A request refused before any work: HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _line(text, sent=()) -> str:
    """One line of at most MAX_MESSAGE characters, quoting at most MAX_QUOTED of any string the request sent."""
    text = " ".join(str(text).split())
    for value in sorted(sent, key=len, reverse=True):
        if len(value) > MAX_QUOTED:
            text = text.replace(value, value[:MAX_QUOTED] + "…")
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _strings(value) -> list[str]:
    """Every string in a request (its names), to be clipped where a message quotes them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, BaseModel):
        value = value.model_dump()
    elif dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _problem(exc: ValidationError) -> str:
    """The first problem of a rejected request (where and why, never the value sent), and how many more."""
    errors = exc.errors(include_input=False, include_url=False, include_context=False)
    first = errors[0]
    where = ".".join(_line(part, [str(part)]) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg'].removeprefix('Value error, ')}{more}"


def _query(model: type[_Body], request: Request) -> _Body:
    raw = {key: value for key, value in request.query_params.items() if key != "token"}
    if len(raw) != len([key for key, _ in request.query_params.multi_items() if key != "token"]):
        raise Refused(400, "a query parameter given twice")
    try:
        return model.model_validate({key: value for key, value in raw.items() if value != ""})
    except ValidationError as exc:
        raise Refused(400, _problem(exc)) from None


async def _body(model: type[_Body], request: Request) -> _Body:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise Refused(400, _problem(exc)) from None


# ---- who may ask ----------------------------------------------------------------------------------------------
class Guard:
    """ASGI middleware: refuses, in one line, a request without the token, naming another host, or (changing
    state) from another origin or not as JSON, or with a body over MAX_BODY_BYTES."""

    def __init__(self, app, token: str | None, host: str, cookie: str):
        self.app, self.token, self.cookie = app, token, cookie
        self.hosts = LOCAL_NAMES | {host.strip("[]").lower()}
        # Bound to every interface: reached by any of this machine's addresses (an address cannot be
        # rebound to another site; only names can), or by its own names.
        self.any_address = _wildcard(host)
        if self.any_address:
            self.hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check(Request(scope))
        except Refused as refused:
            return await JSONResponse({"error": _line(str(refused))}, status_code=refused.status)(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, request: Request) -> None:
        host = request.headers.get("host", "")
        name = _hostname(host)
        if not (name in self.hosts or (self.any_address and _is_address(name))):
            raise Refused(403, "host not allowed: open the explorer at the address it printed")
        # The page's own code (/page/) holds no data: served without the token, so that the page loads inside
        # a notebook's IFrame, where the browser withholds its cookie and the page sends the URL's token.
        public = request.scope["path"].startswith("/page/") and ".." not in request.scope["path"]
        if self.token is not None and not public and not any(secrets.compare_digest(sent.encode(), self.token.encode()) for sent in (
                request.cookies.get(self.cookie, ""), request.query_params.get("token", ""),
                request.headers.get("authorization", "").removeprefix("token ").strip()) if sent):
            raise Refused(403, "no valid token: open the URL the explorer printed (it ends with ?token=...)")
        if request.method in ("GET", "HEAD"):
            return
        origin = request.headers.get("origin")
        if (origin is not None and urlsplit(origin).netloc != host) or request.headers.get("sec-fetch-site") == "cross-site":
            raise Refused(403, "cross-origin request refused")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise Refused(415, "send JSON (Content-Type: application/json)")
        length = request.headers.get("content-length")
        # A chunked body would be read whatever its Content-Length says (HTTP/1.1: Transfer-Encoding wins).
        if length is None or not length.isdigit() or "transfer-encoding" in request.headers:
            raise Refused(411, "a Content-Length is required (and no Transfer-Encoding)")
        if int(length) > MAX_BODY_BYTES:
            raise Refused(413, f"request body over {MAX_BODY_BYTES // 1024} KiB")


HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]{1,5})?")


def _hostname(host: str) -> str | None:
    """`localhost:8765` -> `localhost`; `[::1]:8765` -> `::1`; None for anything that is not a host[:port]."""
    found = HOST_HEADER.fullmatch(host)
    return (found["v6"] or found["name"]).lower() if found else None


def _ip(host: str | None):
    """`host` as an IP address (`[::1]` too), or None for a name."""
    try:
        return ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return None


def _is_address(name: str | None) -> bool:
    return _ip(name) is not None


def _wildcard(host: str) -> bool:
    return (ip := _ip(host)) is not None and ip.is_unspecified


def _loopback(host: str) -> bool:
    return host == "localhost" or ((ip := _ip(host)) is not None and ip.is_loopback)


# ---- the app --------------------------------------------------------------------------------------------------
def app(explorer: Explorer, token: str | None, host: str = "127.0.0.1", port: int = 0) -> Starlette:
    """The explorer's ASGI app; `token` None serves anyone who can reach it."""
    # Clicks share prepared maps; a search has its own lock and readers, so that building an index (minutes
    # at real size, once per variant) never holds a click back.
    clicks, searches = threading.Lock(), threading.Lock()
    cookie = f"dift-explorer-{port}"  # cookies ignore ports: one per server on this host

    async def answer(work, *args, lock=clicks):
        def locked():
            with lock, _torch_threads(1) if lock is clicks else contextlib.nullcontext():
                return work(*args)
        try:
            return JSONResponse(await run_in_threadpool(locked))
        except Exception as exc:
            expected = as_expected(exc)  # a bad name, a missing store, a damaged chunk; anything else is a bug
            if expected is None:
                raise
            return JSONResponse({"error": _line(expected, _strings(args))}, status_code=400)

    def route(handler):
        async def guarded(request: Request):
            try:
                return await handler(request)
            except Refused as refused:
                return JSONResponse({"error": _line(str(refused))}, status_code=refused.status)
            except PipelineError as exc:
                return JSONResponse({"error": _line(exc, _strings(dict(request.query_params)))}, status_code=400)
        return guarded

    async def index(request: Request):
        response = FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-store"})
        if token is not None and request.query_params.get("token") == token:
            response.set_cookie(cookie, token, httponly=True, samesite="strict")
        return response

    async def catalogue(request: Request):
        return await answer(explorer.catalogue)

    async def pairs(request: Request):
        q = _query(PairsQuery, request)
        return await answer(explorer.pair_list, q.category, q.flag, q.value, q.right, q.wrong)

    async def pair(request: Request):
        return await answer(explorer.pair, _query(NameQuery, request).name)

    async def image(request: Request):
        key = _query(KeyQuery, request).key
        try:
            path = explorer.image_path(key)
        except PipelineError as exc:
            return JSONResponse({"error": _line(exc, [key])}, status_code=404)
        if not path.is_file():
            return JSONResponse({"error": _line(f"image: {key}: file missing under the dataset root", [key])},
                                status_code=404)
        return FileResponse(path)

    async def warm(request: Request):
        body = await _body(WarmBody, request)
        return await answer(lambda: explorer.warm([v.variant() for v in body.variants], body.pair, body.trg) or {})

    async def click(request: Request):
        body = await _body(ClickBody, request)
        return await answer(explorer.click, [v.variant() for v in body.variants], (body.x, body.y), body.pair,
                            body.src, body.trg, body.keypoint)

    async def search(request: Request):
        body = await _body(SearchBody, request)
        return await answer(explorer.search, body.variant.variant(), body.image, (body.x, body.y), body.top,
                            lock=searches)

    starlette = Starlette(routes=[
        Route("/", route(index)),
        Route("/api/catalogue", route(catalogue)),
        Route("/api/pairs", route(pairs)),
        Route("/api/pair", route(pair)),
        Route("/api/warm", route(warm), methods=["POST"]),
        Route("/api/click", route(click), methods=["POST"]),
        Route("/api/search", route(search), methods=["POST"]),
        Route("/image", route(image)),
        Mount("/page", StaticFiles(directory=PAGE)),
    ])
    return Guard(starlette, token, host, cookie)


@contextlib.contextmanager
def _torch_threads(count: int):
    """A click is many small tensor operations: on one thread they take less time than on several (the
    explorer guide, Speed; benchmarks/explore.py), as no thread pool is woken for each."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bind(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket (port 0: any free port), refused in one line when the port is taken. SO_REUSEADDR:
    a restart binds at once, though the last server's connections linger in TIME_WAIT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise PipelineError(None, "port", f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return sock


def new_token() -> str:
    return secrets.token_urlsafe(24)


def address(sock: socket.socket, host: str, token: str | None) -> str:
    """The URL to open: the bound port, and the token (as Jupyter prints it)."""
    shown = "127.0.0.1" if _wildcard(host) else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")


def _refuse_exposed_without_token(host: str, token: str | None) -> None:
    if token is None and not _loopback(host):
        raise PipelineError(None, "no-token", f"serving {host} without a token would let anyone who reaches it drive "
                            "the explorer; keep the token, or listen on 127.0.0.1")


def _listening(explorer: Explorer, port: int, host: str, token: str | None):
    """(socket, token, uvicorn server) for `explorer`; `token` "new" makes one, None serves without (loopback only)."""
    token = new_token() if token == "new" else token
    _refuse_exposed_without_token(host, token)
    sock = bind(port, host)
    server = uvicorn.Server(uvicorn.Config(app(explorer, token, host, sock.getsockname()[1]), log_level="warning"))
    return sock, token, server


def serve(explorer: Explorer, port: int = 8765, host: str = "127.0.0.1", token: str | None = "new") -> None:
    """Serve until interrupted, saying what a host other than the loopback, or no token, exposes."""
    sock, token, server = _listening(explorer, port, host, token)
    if not _loopback(host):
        print(f"explorer: listening on {host}: anyone who can reach this machine on port {sock.getsockname()[1]}"
              + (" and has the token" if token else "") + " can read the stores and the dataset's images",
              file=sys.stderr, flush=True)
    if token is None:
        print("explorer: no token (--no-token): any program or web page that can reach the port drives it",
              file=sys.stderr, flush=True)
    print(f"explorer: {address(sock, host, token)}  (Ctrl+C stops it)", flush=True)
    server.run(sockets=[sock])


class Background:
    """The server in a thread of this process: for notebooks and tests. `url` (with the token), `token`,
    `stop()`."""

    def __init__(self, explorer: Explorer, port: int = 0, host: str = "127.0.0.1", token: str | None = "new"):
        sock, self.token, self.server = _listening(explorer, port, host, token)
        self.port = sock.getsockname()[1]
        self.url = address(sock, host, self.token)
        self.base = self.url.split("?")[0]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def iframe(self, height: int = 900):
        """The page inline in a Jupyter notebook."""
        from IPython.display import IFrame  # IPython: only a notebook has it (not a dependency)

        return IFrame(self.url, width="100%", height=height)

