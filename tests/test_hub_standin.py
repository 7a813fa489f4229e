"""models/<name> from a hub repository, through tests/hub_standin.py: only the needed components' files are
downloaded, byte for byte, and each failure (revision, gated) is the stage's one-line error.

huggingface_hub fixes HF_ENDPOINT and HF_HUB_OFFLINE at import (CI exports HF_HUB_OFFLINE=1), so the client
runs in a subprocess with its own environment; protocol checks run here with httpx2, which ignores both."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from hub_standin import hub_standin

pytestmark = pytest.mark.slow  # downloads from a stand-in hub over HTTP

REPO = Path(__file__).resolve().parents[1]
SOURCE, GATED = "standin/tiny-sd2", "standin/tiny-sd2-gated"
PINNED = hashlib.sha1(b"tiny-sd2").hexdigest()
NEEDED = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
TOKEN = "hf_standin_token"
# In the repository beside the pipeline's files, never fetched: variants, .bin duplicates, single-file
# checkpoints, components the stages do not use, the model card
DECOYS = ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
          "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "v2-1_768-ema-pruned.safetensors",
          "v2-1_768-ema-pruned.ckpt", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
          "safety_checker/model.safetensors", "README.md"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny SD2 pipeline folder with decoys, and the files of the pipeline itself (what is needed)."""
    from pipeline.demo.tiny_models import make_tiny

    folder = make_tiny("tiny-sd2", tmp_path_factory.mktemp("hub") / "snapshot")
    needed = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for n, name in enumerate(DECOYS):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"decoy %d " % n + os.urandom(1000))
    return folder, needed


@pytest.fixture(scope="module")
def hub(snapshot):
    with hub_standin({SOURCE: (PINNED, snapshot[0]), GATED: (PINNED, snapshot[0])}, gated={GATED}, token=TOKEN) as hub:
        yield hub


def client_env(hub, home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a huggingface_hub client of `hub`: online, its own cache, the token or none."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                        "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_OIDC_RESOURCE",
                        "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_XET")}  # xet left on: the stand-in must avoid it
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": no_proxy, "no_proxy": no_proxy, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return env | ({"HF_TOKEN": token} if token else {})


def run_client(hub, tmp_path: Path, code: str, token: str | None = None, *args: str) -> dict:
    """Run `code` (it prints one JSON line last) in a subprocess, a client of `hub`."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=client_env(hub, tmp_path / "hf-home", token))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MATERIALISE = """
import json, sys
from pipeline.errors import PipelineError
from pipeline.workflows.fetch import materialise
source, out, revision = sys.argv[1:4]
try:
    materialise(source, out, revision=revision, needed=json.loads(sys.argv[4]))
    print(json.dumps({"error": None}))
except PipelineError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def materialise(hub, tmp_path: Path, source: str, revision: str = PINNED, token: str | None = None):
    """models/<name> from `source` through the stand-in: the folder, the one-line error or None, and the
    files this call asked about (any method) and downloaded (GET, served)."""
    out, before = tmp_path / "model", len(hub.requests)
    result = run_client(hub, tmp_path, MATERIALISE, token, source, str(out), revision, json.dumps(NEEDED))
    requests = [(method, path.split("/resolve/")[1].split("/", 1)[1], status)
                for method, path, status in hub.requests[before:] if "/resolve/" in path]
    downloaded = [name for method, name, status in requests if method == "GET" and status in (200, 206)]
    return out, result["error"], {name for _, name, _ in requests}, downloaded


@pytest.fixture(scope="module")
def fetched(hub, tmp_path_factory):
    return materialise(hub, tmp_path_factory.mktemp("fetched"), SOURCE)


def test_only_the_needed_files_are_downloaded_byte_for_byte(fetched, snapshot, hub):
    from pipeline.workflows.fetch import is_complete

    out, error, requested, downloaded = fetched
    folder, needed = snapshot
    assert error is None
    assert is_complete(out, NEEDED)
    assert sorted(downloaded) == needed  # each once, none of the decoys
    assert requested == set(needed), "a decoy's metadata was asked for"
    assert all((out / name).read_bytes() == (folder / name).read_bytes() for name in needed)
    ours = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert ours == set(needed) | {".dift-cache-source.json"}


def test_the_downloaded_folder_loads_as_a_pipeline(fetched):
    from diffusers import StableDiffusionPipeline

    from pipeline.models.hub import quiet

    quiet()
    pipe = StableDiffusionPipeline.from_pretrained(fetched[0])
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.tokenizer("a cat").input_ids


def test_a_revision_not_in_the_repository_is_a_one_line_error(hub, tmp_path):
    other = hashlib.sha1(b"another commit").hexdigest()
    out, error, requested, downloaded = materialise(hub, tmp_path, SOURCE, revision=other)
    assert error == f"{SOURCE}: revision: no revision {other!r} in this repository"
    assert requested == set()


@pytest.mark.parametrize("token", [None, "hf_not_the_token"])
def test_gated_repository_without_access_is_a_one_line_error(hub, tmp_path, token):
    out, error, requested, downloaded = materialise(hub, tmp_path, GATED, token=token)
    assert error.startswith(f"{GATED}: gated repository: accept its licence") and "\n" not in error
    assert downloaded == []


def test_gated_repository_with_the_token_downloads(hub, snapshot, tmp_path):
    """huggingface_hub sends HF_TOKEN to a non-huggingface.co HF_ENDPOINT: the files are served."""
    out, error, requested, downloaded = materialise(hub, tmp_path, GATED, token=TOKEN)
    assert error is None and sorted(downloaded) == snapshot[1]


def test_from_pretrained_by_hub_id(hub, tmp_path):
    """diffusers and transformers load from the stand-in by id (model info with siblings, tree, resolve)."""
    code = f"""
import json
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from pipeline.models.hub import quiet
quiet()
unet = UNet2DConditionModel.from_pretrained({SOURCE!r}, subfolder="unet", revision={PINNED!r})
text = CLIPTextModel.from_pretrained({SOURCE!r}, subfolder="text_encoder", revision={PINNED!r})
tokenizer = CLIPTokenizer.from_pretrained({SOURCE!r}, subfolder="tokenizer", revision={PINNED!r})
print(json.dumps([type(unet).__name__, type(text).__name__, len(tokenizer("a cat").input_ids) > 0]))
"""
    assert run_client(hub, tmp_path, code) == ["UNet2DConditionModel", "CLIPTextModel", True]


def test_protocol_errors_and_ranges(hub, snapshot):
    """The headers huggingface_hub reads: its exception for each error, and resumable downloads."""
    from huggingface_hub import errors
    from huggingface_hub.utils import hf_raise_for_status

    http = httpx2.Client(base_url=hub.endpoint, trust_env=False)  # no proxy from the environment

    def raised(url: str, **headers) -> type | None:
        try:
            hf_raise_for_status(http.get(url, headers=headers))
        except errors.HfHubHTTPError as exc:
            return type(exc)
        return None

    weights = f"/{SOURCE}/resolve/{PINNED}/unet/diffusion_pytorch_model.safetensors"
    assert raised(f"/api/models/standin/nope/revision/{PINNED}") is errors.RepositoryNotFoundError
    assert raised(f"/api/models/{SOURCE}/revision/{'0' * 40}") is errors.RevisionNotFoundError
    assert raised(f"/{SOURCE}/resolve/main/no-such-file.json") is errors.RemoteEntryNotFoundError
    assert raised(f"/{GATED}/resolve/{PINNED}/model_index.json") is errors.GatedRepoError
    assert raised(f"/{GATED}/resolve/{PINNED}/model_index.json", Authorization="Bearer hf_x") is errors.GatedRepoError
    assert raised(f"/{GATED}/resolve/{PINNED}/model_index.json", Authorization=f"Bearer {TOKEN}") is None
    assert raised(f"/api/models/{SOURCE}/revision/main") is None

    head = http.head(weights, headers={"Accept-Encoding": "identity"})
    data = (snapshot[0] / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert head.headers["X-Repo-Commit"] == PINNED and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["ETag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert not [name for name in head.headers if name.lower().startswith("x-xet")] and "xet-auth" not in head.links
    part = http.get(weights, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == data[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert hub.downloaded(SOURCE)[-1] == "unet/diffusion_pytorch_model.safetensors"
    info = http.get(f"/api/models/{GATED}/revision/{PINNED}", params={"blobs": True}).json()
    assert info["sha"] == PINNED and info["gated"] == "manual"
    sizes = {sibling["rfilename"]: sibling["size"] for sibling in info["siblings"]}
    assert sizes["unet/diffusion_pytorch_model.safetensors"] == len(data)
