import hashlib
import io
import os
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.data import download as dl
from pipeline.data.download import Dataset, download
from pipeline.errors import PipelineError

FILES = {
    "SPair-71k/JPEGImages/cat/a.jpg": os.urandom(300_000),  # incompressible: the archive stays ~300 KB
    "SPair-71k/PairAnnotation/test/x.json": b'{"src_imname": "a.jpg"}',
    "SPair-71k/Layout/large/test.txt": b"x\n",
}


@dataclass
class Serving:
    """What the test server sends, its fault switches, and the Range header of each request it got."""

    body: bytes = b""
    cut_after: int | None = None  # send this many body bytes, then close (once)
    stall_after: int | None = None  # send this many body bytes, then go silent (once)
    ignore_range: bool = False
    ranges: list = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        serving = self.server.serving
        asked = self.headers.get("Range")
        serving.ranges.append(asked)
        body, start = serving.body, 0
        if asked and not serving.ignore_range:
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if serving.cut_after is not None:
            data, serving.cut_after = data[:serving.cut_after], None
        if serving.stall_after is not None:
            self.wfile.write(data[:serving.stall_after])
            serving.stall_after = None
            time.sleep(0.5)
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.serving = Serving()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def tarball(files=FILES, extra=()) -> bytes:
    """A .tar.gz of `files`, then the `extra` TarInfo members (file bodies: b"evil")."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            if info.isreg():
                info.size = 4
            tar.addfile(info, io.BytesIO(b"evil") if info.isreg() else None)
    return buffer.getvalue()


def serve(server, body: bytes) -> Dataset:
    server.serving.body = body
    url = f"http://127.0.0.1:{server.server_address[1]}/SPair-71k.tar.gz"
    return Dataset(url=url, archive="SPair-71k.tar.gz", folder="SPair-71k")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_extracted(folder, body):
    for name, data in FILES.items():
        assert (folder.parent / name).read_bytes() == data
    assert (folder / ".complete").read_text().strip() == sha(body)
    assert (folder.parent / "SPair-71k.tar.gz").read_bytes() == body


def leftovers(dest):
    """Anything in dest besides the archive and its digest: partial trees, staging folders."""
    return sorted(p.name for p in dest.iterdir() if p.name not in {"SPair-71k.tar.gz", "SPair-71k.tar.gz.sha256"})


def test_download_extracts_and_second_call_is_offline(server, tmp_path, capsys):
    body = tarball()
    dataset = serve(server, body)
    folder = download(dataset, tmp_path / "data")
    assert folder == tmp_path / "data" / "SPair-71k"
    assert_extracted(folder, body)
    assert (tmp_path / "data" / "SPair-71k.tar.gz.sha256").read_text() == f"{sha(body)}  SPair-71k.tar.gz\n"
    assert sha(body) in capsys.readouterr().out  # no pinned digest: print it so it can be pinned
    assert leftovers(tmp_path / "data") == ["SPair-71k"]
    assert server.serving.ranges == [None]

    assert download(dataset, tmp_path / "data", sha256=sha(body).upper()) == folder
    assert server.serving.ranges == [None]  # no second request


def test_dropped_connection_resumes_with_range(server, tmp_path):
    body = tarball()
    dataset = serve(server, body)
    server.serving.cut_after = 100_000
    with pytest.raises(PipelineError) as error:
        download(dataset, tmp_path, sha256=sha(body))
    message = str(error.value)
    assert "\n" not in message and "resume" in message and message.startswith(dataset.url)
    assert (tmp_path / "SPair-71k.tar.gz.partial").stat().st_size == 100_000
    assert not (tmp_path / "SPair-71k").exists()

    folder = download(dataset, tmp_path, sha256=sha(body))
    assert server.serving.ranges == [None, "bytes=100000-"]
    assert_extracted(folder, body)
    assert not (tmp_path / "SPair-71k.tar.gz.partial").exists()


def test_stalled_server_times_out_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "TIMEOUT", 0.1)
    body = tarball()
    dataset = serve(server, body)
    server.serving.stall_after = 50_000
    with pytest.raises(PipelineError, match="timed out.*run again to resume"):
        download(dataset, tmp_path)
    assert (tmp_path / "SPair-71k.tar.gz.partial").stat().st_size == 50_000
    assert_extracted(download(dataset, tmp_path), body)
    assert server.serving.ranges == [None, "bytes=50000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    body = tarball()
    dataset = serve(server, body)
    (tmp_path / "SPair-71k.tar.gz.partial").write_bytes(b"stale bytes the server will not continue")
    server.serving.ignore_range = True
    folder = download(dataset, tmp_path, sha256=sha(body))
    assert server.serving.ranges == ["bytes=40-"]
    assert_extracted(folder, body)


def test_partial_as_long_as_the_file_restarts(server, tmp_path):
    body = tarball()
    dataset = serve(server, body)
    (tmp_path / "SPair-71k.tar.gz.partial").write_bytes(body)  # killed between last write and rename
    assert_extracted(download(dataset, tmp_path), body)
    assert server.serving.ranges == [f"bytes={len(body)}-", None]  # 416, then from zero


def test_checksum_mismatch_deletes_the_archive(server, tmp_path):
    body = tarball()
    dataset = serve(server, body)
    with pytest.raises(PipelineError) as error:
        download(dataset, tmp_path, sha256="ab" * 32)
    assert error.value.field == "sha256"
    assert str(error.value) == (f"{tmp_path / 'SPair-71k.tar.gz'}: sha256: expected {'ab' * 32}, found {sha(body)}; "
                                "the archive was deleted")
    assert list(tmp_path.iterdir()) == []


def test_malformed_checksum_is_refused_before_downloading(server, tmp_path):
    dataset = serve(server, tarball())
    with pytest.raises(PipelineError, match="sha256: expected 64 hexadecimal digits"):
        download(dataset, tmp_path, sha256="abc")
    assert server.serving.ranges == []


@pytest.mark.parametrize("make", [
    lambda outside: tarfile.TarInfo("../evil.txt"),
    lambda outside: tarfile.TarInfo(str(outside / "evil.txt")),
    lambda outside: link("SPair-71k/escape", "../../../evil.txt"),
    lambda outside: link("SPair-71k/escape", str(outside / "evil.txt")),
], ids=["dotdot", "absolute", "symlink", "absolute-symlink"])
def test_unsafe_member_is_refused_and_nothing_escapes(server, tmp_path, make):
    dest = tmp_path / "data"
    member = make(tmp_path)
    dataset = serve(server, tarball(extra=[member]))  # after the safe files: those must be cleaned up too
    with pytest.raises(PipelineError) as error:
        download(dataset, dest)
    assert error.value.field == member.name
    assert "unsafe member" in str(error.value) and "\n" not in str(error.value)
    assert [p for p in tmp_path.rglob("*") if p.name in {"evil.txt", "escape"}] == []
    assert leftovers(dest) == []  # no final folder, no staging folder


def link(name, target) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_truncated_archive_is_a_one_line_error_and_deleted(server, tmp_path):
    body = tarball()
    dataset = serve(server, body[: len(body) // 2])
    with pytest.raises(PipelineError, match="corrupt archive") as error:
        download(dataset, tmp_path)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_archive_without_the_expected_folder(server, tmp_path):
    dataset = serve(server, tarball({"other/a.txt": b"a"}))
    with pytest.raises(PipelineError, match="no top-level folder 'SPair-71k'"):
        download(dataset, tmp_path)
    assert leftovers(tmp_path) == []


def test_existing_folder_not_ours_is_left_alone(server, tmp_path):
    dataset = serve(server, tarball())
    (tmp_path / "SPair-71k").mkdir()
    (tmp_path / "SPair-71k" / "mine.txt").write_text("keep")
    with pytest.raises(PipelineError, match="not a finished download"):
        download(dataset, tmp_path)
    assert (tmp_path / "SPair-71k" / "mine.txt").read_text() == "keep"
    assert server.serving.ranges == []


def test_unknown_dataset_and_registry():
    with pytest.raises(PipelineError) as error:
        download("x", "unused")
    assert str(error.value) == "dataset: unknown dataset 'x'; expected one of ['davis', 'hpatches', 'spair71k']"
    assert dl.DATASETS["spair71k"].url.endswith("/SPair-71k.tar.gz")
    assert dl.DATASETS["hpatches"].url.endswith("/hpatches-sequences-release.tar.gz")
    assert dl.DATASETS["davis"].url.endswith("/DAVIS-2017-trainval-480p.zip") and dl.DATASETS["davis"].folder == "DAVIS"


def test_cli_and_dvc_stage_download_the_dataset(server, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli import cli
    from stages import download as stage

    body = tarball()
    dataset = serve(server, body)
    result = CliRunner().invoke(cli, ["download", "spair71k", "--dest", str(tmp_path / "cli"), "--url", dataset.url,
                                      "--sha256", sha(body)])
    assert result.exit_code == 0, result.output
    assert_extracted(tmp_path / "cli" / "SPair-71k", body)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"download:\n  spair71k: {{root: data/SPair-71k, url: '{dataset.url}'}}\n")
    stage.main("spair71k")
    assert_extracted(tmp_path / "data" / "SPair-71k", body)
    (tmp_path / "params.yaml").write_text("download:\n  spair71k: {root: data/spair}\n")
    with pytest.raises(PipelineError, match=r"download.spair71k.root: the archive unpacks to 'SPair-71k'"):
        stage.main("spair71k")
