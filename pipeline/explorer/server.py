"""The explorer's web server: a small ASGI app (Starlette, served by uvicorn) over an `Explorer`, and the
static page in `page/`. It listens on 127.0.0.1 only: nothing leaves the machine.

The page asks JSON questions (`/api/...`) and the server answers from cache; images are served from the
dataset root. Work runs in a thread pool, one request at a time (the caches are shared), so a click never
waits behind the page's image downloads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.errors import PipelineError
from pipeline.explorer import Explorer, Variant

PAGE = Path(__file__).with_name("page")


def app(explorer: Explorer) -> Starlette:
    lock = threading.Lock()

    async def answer(work, *args, **kwargs):
        def locked():
            with lock, _torch_threads(1):
                return work(*args, **kwargs)
        try:
            return JSONResponse(await run_in_threadpool(locked))
        except PipelineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except (KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc!r}"}, status_code=400)

    async def index(request: Request):
        return FileResponse(PAGE / "index.html")

    async def catalogue(request: Request):
        return await answer(explorer.catalogue)

    async def pairs(request: Request):
        q = request.query_params
        value = q.get("value")
        return await answer(explorer.pair_list, q.get("category") or None, q.get("flag") or None,
                            int(value) if value not in (None, "") else None, q.get("right") or None,
                            q.get("wrong") or None)

    async def pair(request: Request):
        return await answer(explorer.pair, request.query_params["name"])

    async def image(request: Request):
        try:
            return FileResponse(explorer.image_path(request.query_params["key"]))
        except PipelineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    async def warm(request: Request):
        body = await request.json()
        return await answer(lambda: explorer.warm(_variants(body), body.get("pair"), body.get("trg")) or {})

    async def click(request: Request):
        body = await request.json()
        return await answer(explorer.click, _variants(body), (body.get("x", 0), body.get("y", 0)), body.get("pair"),
                            body.get("src"), body.get("trg"), body.get("keypoint"))

    async def search(request: Request):
        body = await request.json()
        return await answer(explorer.search, Variant(**body["variant"]), body["image"], (body["x"], body["y"]),
                            int(body.get("top", 20)))

    return Starlette(routes=[
        Route("/", index),
        Route("/api/catalogue", catalogue),
        Route("/api/pairs", pairs),
        Route("/api/pair", pair),
        Route("/api/warm", warm, methods=["POST"]),
        Route("/api/click", click, methods=["POST"]),
        Route("/api/search", search, methods=["POST"]),
        Route("/image", image),
        Mount("/page", StaticFiles(directory=PAGE)),
    ])


@contextlib.contextmanager
def _torch_threads(count: int):
    """A click is many small tensor operations: on one thread they take about half the time (measured on the
    demo: 58 vs 113 ms for 8 maps on 2 cores), as no thread pool is woken for each."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _variants(body: dict) -> list[Variant]:
    return [Variant(v["store"], v["layer"], int(v["timestep"]), v.get("transform", "raw")) for v in body["variants"]]


def bind(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket (port 0: any free port), refused in one line when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipelineError(None, "port", f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return sock


def serve(explorer: Explorer, port: int = 8765, host: str = "127.0.0.1") -> None:
    """Serve until interrupted."""
    sock = bind(port, host)
    print(f"explorer: http://{host}:{sock.getsockname()[1]}/  (Ctrl+C stops it)", flush=True)
    uvicorn.Server(uvicorn.Config(app(explorer), log_level="warning")).run(sockets=[sock])


class Background:
    """The server in a thread of this process: for notebooks and tests. `url`; `stop()`."""

    def __init__(self, explorer: Explorer, port: int = 0, host: str = "127.0.0.1"):
        sock = bind(port, host)
        self.url = f"http://{host}:{sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app(explorer), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def iframe(self, height: int = 900):
        """The page inline in a Jupyter notebook."""
        from IPython.display import IFrame

        return IFrame(self.url, width="100%", height=height)
