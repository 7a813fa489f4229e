"""A local stand-in for the Hugging Face hub: enough of its HTTP protocol for huggingface_hub (2.4) to
`snapshot_download` / `hf_hub_download` / `model_info` from it, and so for `from_pretrained` of transformers
and diffusers, with `HF_ENDPOINT=<HubStandin.endpoint>`.

    with hub_standin({"org/tiny": (REVISION, folder)}, gated={"org/tiny"}) as hub:
        ...  # a client run with HF_ENDPOINT=hub.endpoint; then assert on hub.requests / hub.downloaded("org/tiny")

Served, for each repository (a 40-hex revision and a folder holding that revision's files):
  GET  /api/models/{repo}[/revision/{rev}]       model info: id, sha, siblings (sizes, blob ids, LFS with
                                                 ?blobs=true, as the hub does for `files_metadata`), gated
  GET  /api/models/{repo}/tree/{rev}[/{path}]    the tree listing (?recursive=true); `snapshot_download` with a
                                                 40-hex revision lists the tree and skips the model info call
  HEAD /{repo}/resolve/{rev}/{path}              metadata: X-Repo-Commit, ETag (git blob sha1; sha256 for
                                                 LFS-like weights, with X-Linked-Etag / X-Linked-Size), Content-Length;
                                                 answered here, where the hub redirects LFS files to its CDN (the
                                                 client reads the same headers either way)
  GET  /{repo}/resolve/{rev}/{path}              the bytes, with `Range: bytes=a-[b]` (206) for resumed downloads
`rev` is the pinned revision or "main" (which resolves to it), URL-quoted as the client sends it.
Errors carry the `X-Error-Code` that `hf_raise_for_status` maps to an exception: RepoNotFound (404,
RepositoryNotFoundError), RevisionNotFound (404, RevisionNotFoundError), EntryNotFound (404,
RemoteEntryNotFoundError), GatedRepo (401 without a token, 403 with a wrong one: GatedRepoError, a subclass of
RepositoryNotFoundError). Anything else is a bare 404.

Gated repositories behave as on the hub: their model info and tree listing are public (the hub shows a gated
repo's files), only the files (`resolve`) need `Authorization: Bearer <token>`. huggingface_hub sends the
token to any HF_ENDPOINT, not only huggingface.co: `build_hf_headers` adds it from HF_TOKEN (or HF_HOME/token)
to every hub call unless HF_HUB_DISABLE_IMPLICIT_TOKEN is set; it is dropped only on a redirect to another
host, and this stand-in never redirects.

Xet: nothing here advertises it (no `X-Xet-*` headers or `xet-auth` links on `resolve`, no `xetHash` in the
tree), so huggingface_hub takes its plain HTTP path even with hf_xet installed; HF_HUB_DISABLE_XET is not needed.

The client's environment: huggingface_hub reads it once, at import (`huggingface_hub.constants`), so run the
client in a subprocess with HF_ENDPOINT=<endpoint>, HF_HUB_OFFLINE unset or 0 (and TRANSFORMERS_OFFLINE unset:
it implies offline too), HF_HOME in a temporary folder (its cache and token file), HF_TOKEN set or unset as the
case needs, and 127.0.0.1 in NO_PROXY where a proxy is configured. No other variable is required
(HF_HUB_ETAG_TIMEOUT's default of 10 s is ample on loopback).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the hub keeps in Git LFS (by the usual .gitattributes): their ETag is the content's sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf", ".model")
REPO_ID = r"[^/]+(?:/[^/]+)?"  # "name" or "namespace/name"


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files), as the hub's tree and `oid` report
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _scan(folder: Path) -> dict[str, _File]:
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.split("/")[0] in (".git", ".cache"):
            continue
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else None
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        files[name] = _File(path, len(data), _git_sha1(pointer if sha256 else data), sha256)
    return files


@dataclass
class _Repo:
    revision: str
    files: dict[str, _File]
    gated: bool


@dataclass
class HubStandin:
    endpoint: str
    repos: dict[str, _Repo]
    token: str
    # (method, path, status) of every request served; path is URL-decoded, without the query
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def downloaded(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose bytes were served (GET of `resolve`, 200 or 206), in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return [path[len(prefix):].split("/", 1)[1] for method, path, status in self.requests
                    if method == "GET" and status in (200, 206) and path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    hub: HubStandin  # set on the subclass made per server

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._serve(body=True)

    def log_message(self, *args):  # quiet: tests read hub.requests
        pass

    def _serve(self, body: bool):
        url = urlsplit(self.path)
        self._path, self._body, self._query = unquote(url.path), body, parse_qs(url.query)
        try:
            self._route(url.path)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. after the headers)
            pass

    def _route(self, raw: str):
        # Route on the raw path: the revision is quoted with safe="" ("refs%2Fpr%2F1"), the file path keeps its "/"
        if self.command in ("GET", "HEAD") and (m := re.fullmatch(rf"/({REPO_ID})/resolve/([^/]+)/(.+)", raw)):
            return self._resolve(m[1], unquote(m[2]), unquote(m[3]))
        if self.command == "GET" and (m := re.fullmatch(rf"/api/models/({REPO_ID})(?:/revision/([^/]+))?", raw)):
            return self._info(m[1], unquote(m[2] or "main"))
        if self.command == "GET" and (m := re.fullmatch(rf"/api/models/({REPO_ID})/tree/([^/]+)(/.*)?", raw)):
            return self._tree(m[1], unquote(m[2]), unquote(m[3] or "/").strip("/"))
        if raw == "/api/agent-harnesses":  # fetched once a day for the user agent; the hub's registry, empty
            return self._json({"standardEnvVars": [], "harnesses": {}})
        self._error(404, None, "Not Found")

    # --- endpoints

    def _info(self, repo_id: str, rev: str):
        if (repo := self._repo(repo_id, rev)) is None:
            return
        siblings = []
        for name, f in repo.files.items():
            lfs = {"lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}} if f.sha256 else {}
            blobs = {"size": f.size, "blobId": f.blob_id, **lfs} if self._flag("blobs") else {}
            siblings.append({"rfilename": name, **blobs})
        self._json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                    "sha": repo.revision, "lastModified": "2024-01-01T00:00:00.000Z", "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "siblings": siblings, "createdAt": "2024-01-01T00:00:00.000Z"})

    def _tree(self, repo_id: str, rev: str, folder: str):
        if (repo := self._repo(repo_id, rev)) is None:
            return
        prefix = f"{folder}/" if folder else ""
        names = [name[len(prefix):] for name in repo.files if name.startswith(prefix)]
        if folder and not names:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{rev}\"", repo)
        recursive = self._flag("recursive")
        entries: dict[str, dict] = {}
        for name in names:
            parts = name.split("/")
            for depth in range(1, len(parts)):  # the folders above the file
                if recursive or depth == 1:
                    path = prefix + "/".join(parts[:depth])
                    entries.setdefault(path, {"type": "directory", "oid": _git_sha1(path.encode()), "size": 0,
                                              "path": path})
            if recursive or len(parts) == 1:
                f, path = repo.files[prefix + name], prefix + name
                lfs = {"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.sha256 else {}
                entries[path] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path, **lfs}
        self._json(sorted(entries.values(), key=lambda e: e["path"]))

    def _resolve(self, repo_id: str, rev: str, name: str):
        if (repo := self._repo(repo_id, rev, files=True)) is None:
            return
        if (f := repo.files.get(name)) is None:
            return self._error(404, "EntryNotFound", "Entry not found", repo)
        start, end = 0, f.size - 1
        status, headers = 200, {"X-Repo-Commit": repo.revision, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                                "Content-Type": "application/octet-stream"}
        if f.sha256:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        # http_get resumes an interrupted download with `bytes=<done>-`; a malformed Range is ignored (RFC 9110)
        if (m := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())) and (m[1] or m[2]):
            if m[1]:  # bytes=a- or bytes=a-b
                start, end = int(m[1]), min(int(m[2] or f.size - 1), f.size - 1)
            else:  # bytes=-n: the last n
                start = max(f.size - int(m[2]), 0)
            if start > end:
                return self._error(416, None, "Range Not Satisfiable", repo, {"Content-Range": f"bytes */{f.size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{f.size}"
        with f.path.open("rb") as handle:
            handle.seek(start)
            self._send(status, headers, handle.read(end - start + 1))

    # --- helpers

    def _repo(self, repo_id: str, rev: str, files: bool = False) -> _Repo | None:
        """The repository, or None once the error is sent. Only files need the token of a gated repository."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif files and repo.gated and (auth := self.headers.get("Authorization")) != f"Bearer {self.hub.token}":
            if auth is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              f"authorized list. Visit https://huggingface.co/{repo_id} to ask for "
                                              "access.")
        elif rev not in (repo.revision, "main"):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        else:
            return repo
        return None

    def _flag(self, name: str) -> bool:
        return self._query.get(name, ["false"])[-1].lower() in ("1", "true")

    def _json(self, data) -> None:
        self._send(200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(data).encode())

    def _error(self, status: int, code: str | None, message: str, repo: _Repo | None = None, extra: dict | None = None):
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:  # as the hub: huggingface_hub caches a missing file under this commit (.no_exist)
            headers["X-Repo-Commit"] = repo.revision
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.hub.log(self.command, self._path, status)  # first: a client that has the reply may read the log
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # of the GET's body, also for a HEAD
        self.end_headers()
        if self._body:
            self.wfile.write(body)


@contextlib.contextmanager
def hub_standin(repos: dict[str, tuple[str, Path]], gated: set[str] = frozenset(),
                token: str = "hf_standin") -> Iterator[HubStandin]:
    """repos: repo_id -> (pinned 40-hex revision, folder whose files are that revision's snapshot).
    Serves on 127.0.0.1 (a free port) from a daemon thread until the block ends."""
    assert all(re.fullmatch(r"[0-9a-f]{40}", rev) for rev, _ in repos.values()), "revisions are 40-hex commits"
    assert set(gated) <= set(repos), f"gated repositories not served: {set(gated) - set(repos)}"
    hub = HubStandin("", {repo_id: _Repo(rev, _scan(folder), repo_id in gated)
                          for repo_id, (rev, folder) in repos.items()}, token)
    handler = type("Handler", (_Handler,), {"hub": hub, "timeout": 60})  # idle keep-alive connections end
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # handler threads of kept-alive connections must not hold up the exit
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="hub-standin", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
