"""The tiny SD2/SD3 stand-ins load as real diffusers pipelines and have the real models' shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from pipeline.demo.tiny_models import (
    SD2_UNET_CONFIG,
    SD3_NO_T5_LOAD_KWARGS,
    SD3_TRANSFORMER_CONFIG,
    make_tiny,
    make_tiny_clip_tokenizer,
)

torch.set_num_threads(2)

PROMPT = "a photo of a bird"
SD2_SUBFOLDERS = {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
SD3_SUBFOLDERS = {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "scheduler"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(name, root / name, seed=0) for name in ("tiny-sd2", "tiny-sd3")}


@pytest.fixture(scope="module")
def sd2(built) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(built["tiny-sd2"])


@pytest.fixture(scope="module")
def sd3(built) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(built["tiny-sd3"], **SD3_NO_T5_LOAD_KWARGS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_informative(t: torch.Tensor) -> None:
    assert torch.isfinite(t).all()
    assert t.std() > 1e-4, "random-init model produced a (near-)constant output"


# ---- folder layout / loading ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "subfolders"), [("tiny-sd2", SD2_SUBFOLDERS), ("tiny-sd3", SD3_SUBFOLDERS)])
def test_folder_layout(built, name, subfolders):
    root = built[name]
    assert (root / "model_index.json").is_file()
    present = {p.name for p in root.iterdir() if p.is_dir()}
    assert subfolders <= present
    for sub in subfolders - {"scheduler"}:
        assert any((root / sub).iterdir())
    for tok in [s for s in subfolders if s.startswith("tokenizer")]:
        assert (root / tok / "vocab.json").is_file() and (root / tok / "merges.txt").is_file()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_pipelines_load(sd2, sd3):
    assert isinstance(sd2, StableDiffusionPipeline)
    assert sd2.safety_checker is None
    assert sd2.vae_scale_factor == 8
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.scheduler.config.steps_offset == 1

    assert isinstance(sd3, StableDiffusion3Pipeline)
    assert sd3.text_encoder_3 is None and sd3.tokenizer_3 is None
    assert sd3.vae_scale_factor == 8
    assert sd3.vae.config.latent_channels == 16
    assert sd3.vae.config.shift_factor == pytest.approx(0.0609)
    assert sd3.vae.config.scaling_factor == pytest.approx(1.5305)
    assert sd3.scheduler.config.shift == 3.0


def test_unknown_name_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        make_tiny("tiny-sdxl", tmp_path / "x")


# ---- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sd3"])
def test_same_seed_is_byte_identical(built, tmp_path, name):
    again = make_tiny(name, tmp_path / name, seed=0)
    first, second = _files(built[name]), _files(again)
    assert first.keys() == second.keys()
    differing = [k for k in first if first[k] != second[k]]
    assert differing == []


def test_different_seed_changes_weights(built, tmp_path):
    other = make_tiny("tiny-sd2", tmp_path / "sd2-seed1", seed=1)
    rel = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(built["tiny-sd2"] / rel), load_file(other / rel)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_building_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny("tiny-sd3", tmp_path / "sd3", seed=7)
    assert torch.equal(torch.rand(3), expected)


# ---- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_encodes_prompt(sd2, sd3):
    for tok in (sd2.tokenizer, sd3.tokenizer, sd3.tokenizer_2, make_tiny_clip_tokenizer()):
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert tok.model_max_length == 77 and len(ids) == 77
        assert ids[0] == tok.bos_token_id
        tokens = tok.convert_ids_to_tokens(ids[:7])
        assert tokens[1:6] == ["a</w>", "photo</w>", "of</w>", "a</w>", "bird</w>"]
        assert ids[6] == tok.eos_token_id
        # Unmerged words fall back to byte-level symbols instead of <unk>.
        assert tok.unk_token_id not in tok("zebra äöü 42!", add_special_tokens=False).input_ids
    assert sd2.tokenizer.pad_token == "!"  # OpenCLIP convention (SD2, SD3's second encoder)
    assert sd3.tokenizer.pad_token == "<|endoftext|>"
    assert sd3.tokenizer_2.pad_token == "!"


# ---- forward passes ---------------------------------------------------------------------------


@torch.no_grad()
def test_sd2_forward_and_up_block_1_resolution(sd2):
    tok = sd2.tokenizer
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    encoder_hidden_states = sd2.text_encoder(ids.input_ids)[0]
    assert encoder_hidden_states.shape == (1, 77, sd2.unet.config.cross_attention_dim)
    _assert_informative(encoder_hidden_states)

    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd2.vae.encode(image).latent_dist.mean * sd2.vae.config.scaling_factor
    assert latents.shape == (1, 4, 16, 16)
    _assert_informative(latents)

    captured = {}
    handle = sd2.unet.up_blocks[1].register_forward_hook(lambda mod, args, out: captured.update(ft=out))
    try:
        noise_pred = sd2.unet(latents, torch.tensor([261]), encoder_hidden_states=encoder_hidden_states).sample
    finally:
        handle.remove()
    assert noise_pred.shape == latents.shape
    _assert_informative(noise_pred)

    # Real SD2.1: 1280 channels at image/16; tiny: reversed(block_out_channels)[1] channels.
    expected_channels = tuple(reversed(SD2_UNET_CONFIG["block_out_channels"]))[1]
    assert captured["ft"].shape == (1, expected_channels, 128 // 16, 128 // 16)
    _assert_informative(captured["ft"])


@torch.no_grad()
def test_sd3_forward_and_joint_block_outputs(sd3):
    prompt_embeds, neg, pooled, neg_pooled = sd3.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    assert neg is None and neg_pooled is None
    # CLIP-L/G penultimate states (77 tokens, concat and right-padded to joint_attention_dim)
    # followed by max_sequence_length zero rows standing in for the absent T5.
    assert prompt_embeds.shape == (1, 77 + 77, SD3_TRANSFORMER_CONFIG["joint_attention_dim"])
    assert torch.count_nonzero(prompt_embeds[:, 77:]) == 0
    _assert_informative(prompt_embeds[:, :77])
    assert pooled.shape == (1, SD3_TRANSFORMER_CONFIG["pooled_projection_dim"])
    _assert_informative(pooled)

    transformer = sd3.transformer
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    captured: dict[int, tuple] = {}
    handles = [
        block.register_forward_hook(lambda mod, args, out, k=k: captured.__setitem__(k, out))
        for k, block in enumerate(transformer.transformer_blocks)
    ]
    try:
        out = transformer(
            hidden_states=latents,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
        ).sample
    finally:
        for h in handles:
            h.remove()
    assert out.shape == latents.shape
    _assert_informative(out)

    n_blocks = len(transformer.transformer_blocks)
    assert sorted(captured) == list(range(n_blocks))
    for k, result in captured.items():
        assert isinstance(result, tuple) and len(result) == 2
        encoder_hidden_states, hidden_states = result
        # 16x16 latent, patch 2 -> 8x8 = 64 image tokens.
        assert hidden_states.shape == (1, 64, width)
        _assert_informative(hidden_states)
        if k == n_blocks - 1:
            assert encoder_hidden_states is None  # last block is context_pre_only, as in SD3
        else:
            assert encoder_hidden_states.shape == (1, prompt_embeds.shape[1], width)


@torch.no_grad()
def test_sd3_vae_latent_shape(sd3):
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd3.vae.encode(image).latent_dist.mean
    assert latents.shape == (1, 16, 16, 16)
    _assert_informative(latents)


@torch.no_grad()
def test_sd3_transformer_accepts_512px_canvas(sd3):
    # 512 px -> 64x64 latents -> 32x32 tokens (patch 2): must fit in pos_embed_max_size.
    latents = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    joint_dim = sd3.transformer.config.joint_attention_dim
    pooled_dim = sd3.transformer.config.pooled_projection_dim
    out = sd3.transformer(
        hidden_states=latents,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, joint_dim),
        pooled_projections=torch.randn(1, pooled_dim),
    ).sample
    assert out.shape == latents.shape
    _assert_informative(out)
