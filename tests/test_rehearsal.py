"""Dress rehearsal of the real study: `dvc repro` of each real profile as shipped, in a scratch repository,
with the network replaced by stand-ins on 127.0.0.1.

- The Hugging Face hub (`HF_ENDPOINT`, tests/hub_standin.py) serves every repository the profile pins, at
  its pinned revision, in that repository's real file layout (pipeline/demo/hub_snapshots.py): small
  random-weight models of the real classes and depths, narrow widths, plus the files the `model@` stages
  must not fetch. The gated repositories answer 401 until a token is sent.
- An HTTP server serves a generated SPair-71k tarball (the exact layout, SPair-like image sizes) to
  `download@spair71k`, which loses the connection once and resumes with a Range request; another serves a
  generated HPatches tarball (the release's layout, two sequences) to `download@hpatches`, and a third a
  generated DAVIS-2017 zip (the release's layout, two videos of three frames) to `download@davis`.

What the test changes in the profile it reads, and nothing else, is DEPARTURES.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_project
from hub_standin import hub_standin
from test_download import Handler, Serving

pytestmark = pytest.mark.slow

TOKEN = "hf_rehearsal"
# Every departure from the shipped profile (besides HF_ENDPOINT, the stand-in hub, in the environment):
DEPARTURES = [
    "encoders.*.device, backbones.*.device, match.device: cpu (no GPU in CI)",
    "encoders.*.dtype, backbones.*.dtype: float32 (float16 needs a GPU; bfloat16 is slow on the CPU)",
    "download.spair71k.url: the local server; download.spair71k.sha256: the generated tarball's digest",
    "download.hpatches.url: the local server; download.hpatches.sha256: the generated tarball's digest",
    "download.davis.url: the local server; download.davis.sha256: the generated zip's digest",
    "datasets.davis.device: cpu",
]
# SPair-71k's aspect ratios (its images are ~500 x 375) at 3/5 of the side: DIFT's matching costs in proportion
# to the target's pixels, and the sd2-vs-sd3 profile matches 288 variants (twice: the fidelity sample too).
SPAIR_SIZES = ((300, 225), (225, 300), (300, 200))


def with_departures(profile: dict, url: str, sha256: str, hpatches_url: str, hpatches_sha256: str, davis_url: str,
                    davis_sha256: str) -> dict:
    for section in ("encoders", "backbones"):
        for entry in profile[section].values():
            entry |= {"device": "cpu", "dtype": "float32"}
    profile["match"]["device"] = "cpu"
    profile["download"]["spair71k"] |= {"url": url, "sha256": sha256}
    profile["download"]["hpatches"] |= {"url": hpatches_url, "sha256": hpatches_sha256}
    profile["download"]["davis"] |= {"url": davis_url, "sha256": davis_sha256}
    profile["datasets"]["davis"]["device"] = "cpu"
    return profile


def spair_tarball(base: Path) -> bytes:
    """SPair-71k.tar.gz: the demo's generator in SPair's layout, 2 categories of 5 images each (a source and 4
    warps of it; 10 pairs)."""
    from pipeline.demo.dataset import DemoSpec, generate

    root = generate(base / "SPair-71k", DemoSpec(seed=0, sources_per_category=1, sizes=SPAIR_SIZES, categories=("star", "blob")))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname="SPair-71k")
    return buffer.getvalue()


def hpatches_tarball(base: Path) -> bytes:
    """hpatches-sequences-release.tar.gz: the demo's generator in the release's layout, one illumination and one
    viewpoint sequence (12 images, 10 pairs)."""
    from pipeline.demo.hpatches import HPatchesDemoSpec, generate

    root = generate(base / "hpatches-sequences-release", HPatchesDemoSpec(seed=0, sequences=2, keypoints=None))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname="hpatches-sequences-release")
    return buffer.getvalue()


def davis_zip(base: Path) -> bytes:
    """DAVIS-2017-trainval-480p.zip: the demo's generator in the release's layout (DAVIS/...), two videos of
    three frames (one, then two objects)."""
    import zipfile

    from pipeline.demo.davis import DavisDemoSpec, generate

    root = generate(base / "DAVIS", DavisDemoSpec(seed=0, sequences=2, frames=3))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(root.rglob("*")):
            bundle.write(path, (Path("DAVIS") / path.relative_to(root)).as_posix())
    return buffer.getvalue()


def serve(body: bytes):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.serving = Serving(body=body)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict:
    """The three archives the real profiles download, each on its own local server."""
    running = {"spair71k": serve(spair_tarball(tmp_path_factory.mktemp("spair"))),
               "hpatches": serve(hpatches_tarball(tmp_path_factory.mktemp("hpatches"))),
               "davis": serve(davis_zip(tmp_path_factory.mktemp("davis")))}
    yield running
    for httpd in running.values():
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    """hub id -> its stand-in snapshot, for every model the real profiles pin."""
    from pipeline.demo.hub_snapshots import make_hub_snapshot

    base = tmp_path_factory.mktemp("hub")
    sources = {model["source"] for profile in ("spair71k.yaml", "sd2-vs-sd3.yaml")
               for model in yaml.safe_load((REPO / "profiles" / profile).read_text())["models"].values()}
    return {source: make_hub_snapshot(source, base / source.replace("/", "--")) for source in sorted(sources)}


def scratch_project(base: Path, params: dict) -> Path:
    root = copy_project(base / "project")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "rehearsal"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True)
    return root


def dvc(root: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.parametrize("name", ["spair71k.yaml", "sd2-vs-sd3.yaml"])
def test_the_real_profile_runs_end_to_end_as_shipped(name, tmp_path, servers, snapshots):
    from pipeline.models.realsize import REAL_MODELS

    spair_server, hpatches_server, davis_server = servers["spair71k"], servers["hpatches"], servers["davis"]
    shipped = yaml.safe_load((REPO / "profiles" / name).read_text())
    body = spair_server.serving.body
    url = f"http://127.0.0.1:{spair_server.server_address[1]}/SPair-71k.tar.gz"
    hpatches_url = f"http://127.0.0.1:{hpatches_server.server_address[1]}/hpatches-sequences-release.tar.gz"
    davis_url = f"http://127.0.0.1:{davis_server.server_address[1]}/DAVIS-2017-trainval-480p.zip"
    params = with_departures(shipped, url, hashlib.sha256(body).hexdigest(), hpatches_url,
                             hashlib.sha256(hpatches_server.serving.body).hexdigest(), davis_url,
                             hashlib.sha256(davis_server.serving.body).hexdigest())
    root = scratch_project(tmp_path, params)
    repos = {model["source"]: (model["revision"], snapshots[model["source"]]) for model in params["models"].values()}
    gated = {source for source in repos if REAL_MODELS[source].gated}
    assert gated, "each real profile has a gated model"

    with hub_standin(repos, gated=gated, token=TOKEN) as hub:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
        env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_ENDPOINT": hub.endpoint,
                "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1"}

        # The download drops once; the stage says so in one line, and the next run resumes with a Range.
        spair_server.serving.ranges.clear()
        spair_server.serving.cut_after = len(body) // 2
        dropped = dvc(root, env, "repro", "download@spair71k", ok=False)
        assert dropped.returncode != 0 and "error: " in dropped.stderr and "Traceback" not in dropped.stderr
        dvc(root, env, "repro", "download@spair71k")
        assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in spair_server.serving.ranges)

        # Without a token, a gated model's stage stops with the documented line, and nothing else.
        for model, spec in params["models"].items():
            if spec["source"] in gated:
                refused = dvc(root, env, "repro", "-s", f"model@{model}", ok=False)
                lines = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
                assert lines == [f"error: {spec['source']}: gated repository: accept its licence at "
                                 f"https://huggingface.co/{spec['source']} with your account, then provide a token "
                                 "(`export HF_TOKEN=hf_...` or `hf auth login`)"], refused.stderr[-2000:]
                assert "Traceback" not in refused.stderr

        env["HF_TOKEN"] = TOKEN
        first = dvc(root, env, "repro")
        again = dvc(root, env, "repro")
        status = dvc(root, env, "status")
        fetched = {path for method, path, status_code in hub.requests if method == "GET" and "/resolve/" in path}

    expected = {"prepare", "evaluate", "report"} | {f"model@{m}" for m in params["models"]} \
        | {f"encode@{e}" for e in params["encoders"]} | {f"canvas@{c}" for c in params.get("canvases") or {}} \
        | {f"{stage}@{b}" for b in params["backbones"] for stage in ("extract", "match")} \
        | {"download@hpatches", "hpatches-evaluate"} \
        | {f"hpatches-{step}@{b}" for b in params["datasets"]["hpatches"]["backbones"] for step in ("extract", "match")} \
        | {"download@davis", "davis-evaluate"} \
        | {f"davis-{step}@{b}" for b in params["datasets"]["davis"]["backbones"] for step in ("extract", "propagate")}
    assert stages_run(first.stdout) == expected
    assert stages_run(again.stdout) == set()
    assert "up to date" in status.stdout
    for backbone, spec in params["backbones"].items():
        assert (root / "metrics" / "best" / f"{backbone}.json").is_file(), backbone
        if spec.get("storage", "float16").startswith("pca:"):
            import zarr

            attrs = zarr.open_group(root / "store" / f"{backbone}.zarr", mode="r").attrs.asdict()
            assert "fidelity" in attrs, backbone  # measured before the other images
    assert (root / "reports" / "index.md").is_file()
    accuracy = json.loads((root / "metrics" / "hpatches" / "accuracy.json").read_text())
    assert set(accuracy) - {"protocol"} == set(params["datasets"]["hpatches"]["backbones"])
    scores = json.loads((root / "metrics" / "davis" / "jf.json").read_text())
    assert set(scores) - {"protocol"} == set(params["datasets"]["davis"]["backbones"])
    assert "Temporal correspondence: DAVIS-2017" in (root / "reports" / "index.md").read_text()
    # What the model stages fetched: configs, tokenizers and the default-precision weights of the components
    # used; never a single-file checkpoint, a .bin duplicate or an fp16 variant.
    assert fetched and not any(path.endswith((".bin", ".fp16.safetensors", ".ckpt")) for path in fetched), fetched
