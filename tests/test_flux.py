"""The tiny FLUX stand-in and the `flux` backbone, against direct diffusers computations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import identity_pairs_scored_exactly
import torch
import xarray as xr
import zarr

from pipeline.config import BackboneParams, EncoderParams
from pipeline.cache.encode import encode, load_canvas
from pipeline.errors import PipelineError
from pipeline.cache.extract import extract
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import FLUX_TRANSFORMER_CONFIG, make_tiny, make_tiny_t5_tokenizer

torch.set_num_threads(2)

CANVAS = 128
LAYER = "single_transformer_blocks.1"
FLUX = BackboneParams(kind="flux", model="", latents="", layers=["transformer_blocks.1", LAYER],
                      timesteps=[261], ensemble=1, latent="mean", noise=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_root):
    """The tiny FLUX folder, 4 demo images, their latents store at a 128-px canvas, and one store."""
    base = tmp_path_factory.mktemp("flux")
    images = load_split(demo_root, "test").images.iloc[:4].reset_index(drop=True)
    model = make_tiny("tiny-flux", base / "tiny-flux")
    latents = encode(EncoderParams(model=str(model), canvas=CANVAS), images, demo_root, base / "latents.zarr")
    params = replace(FLUX, model=str(model), latents=str(latents))
    store = extract(params, "tiny-flux", latents, base / "flux.zarr")
    return {"base": base, "images": images, "root": demo_root, "model": model, "latents": latents,
            "params": params, "store": store}


@pytest.fixture(scope="module")
def pipe(world):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(world["model"])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the tiny folder ----------------------------------------------------------------------------


def test_tiny_flux_loads_with_flux_shapes(world, pipe):
    from diffusers import FluxPipeline

    assert isinstance(pipe, FluxPipeline)
    assert pipe.vae_scale_factor == 8
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and not vae.use_quant_conv and not vae.use_post_quant_conv
    assert vae.scaling_factor == pytest.approx(0.3611) and vae.shift_factor == pytest.approx(0.1159)
    scheduler = pipe.scheduler.config
    assert scheduler.shift == 3.0 and scheduler.use_dynamic_shifting
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)
    config = pipe.transformer.config
    assert config.guidance_embeds and config.in_channels == 64
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    size = sum(p.stat().st_size for p in Path(world["model"]).rglob("*") if p.is_file())
    assert size < 5 * 2**20

    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt("a photo of a star", prompt_2=None, max_sequence_length=32)
    assert embeds.shape == (1, 32, config.joint_attention_dim) and torch.isfinite(embeds).all()
    assert pooled.shape == (1, config.pooled_projection_dim) and pooled.std() > 1e-4
    assert text_ids.shape == (32, 3)


def test_t5_tokenizer_has_t5_special_ids(pipe):
    for tok in (pipe.tokenizer_2, make_tiny_t5_tokenizer()):
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        ids = tok("a photo of a star", padding="max_length", max_length=32, truncation=True).input_ids
        assert len(ids) == 32
        assert tok.convert_ids_to_tokens(ids[:6]) == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581star", "</s>"]
        assert ids[6:] == [0] * 26
        assert tok.unk_token_id not in tok("zebra 42!", add_special_tokens=False).input_ids


def test_builder_is_deterministic(world, tmp_path):
    again = make_tiny("tiny-flux", tmp_path / "again", seed=0)
    first, second = _files(Path(world["model"])), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


# ---- the backbone ------------------------------------------------------------------------------


def test_layers_are_block_inputs_equal_to_direct_transformer_call(world, pipe):
    index = 2
    row = world["images"].iloc[index]
    transformer = pipe.transformer
    with torch.no_grad():
        vae = pipe.vae
        canvas = load_canvas(Path(world["root"]) / row["path"], CANVAS, "squash")
        latent = (vae.encode(canvas[None]).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        _, c, h, w = latent.shape
        tokens = pipe._pack_latents(latent, 1, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", latent.dtype)
        embeds, pooled, text_ids = pipe.encode_prompt(f"a photo of a {row['category']}", prompt_2=None,
                                                      max_sequence_length=512)  # FLUX.1-dev default
        captured = {}
        hooks = [
            transformer.transformer_blocks[1].register_forward_pre_hook(
                lambda m, a, kw: captured.update(double=kw["hidden_states"], temb=kw["temb"]), with_kwargs=True),
            transformer.single_transformer_blocks[1].register_forward_pre_hook(
                lambda m, a, kw: captured.update(single=kw["hidden_states"]), with_kwargs=True),
        ]
        out = transformer(hidden_states=tokens, timestep=torch.tensor([0.261]), guidance=torch.tensor([3.5]),
                          encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids,
                          img_ids=img_ids, return_dict=False)[0]
        for hook in hooks:
            hook.remove()
        # The transformer multiplies timestep and guidance by 1000 before embedding them.
        temb = transformer.time_text_embed(torch.tensor([261.0]), torch.tensor([3500.0]), pooled)
        single_shift, single_scale, _ = transformer.single_transformer_blocks[1].norm.linear(
            torch.nn.functional.silu(temb)).chunk(3, dim=1)
        double_shift, double_scale = transformer.transformer_blocks[1].norm1.linear(
            torch.nn.functional.silu(temb)).chunk(6, dim=1)[:2]
    assert out.shape == tokens.shape
    torch.testing.assert_close(captured["temb"], temb)
    grid = CANVAS // 16
    assert captured["single"].shape == (1, grid * grid, transformer.inner_dim)  # image tokens only

    root = zarr.open_group(world["store"], mode="r")
    for layer, key, shift, scale in (
        (LAYER, "single", single_shift, single_scale),
        ("transformer_blocks.1", "double", double_shift, double_scale),
    ):
        expected = captured[key][0].reshape(grid, grid, -1).numpy()
        node = root[layer]
        stored = node["features"][index, 0].astype(np.float32)
        assert stored.shape == (grid, grid, FLUX_TRANSFORMER_CONFIG["num_attention_heads"]
                                * FLUX_TRANSFORMER_CONFIG["attention_head_dim"])
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        np.testing.assert_allclose(node["shift"][index, 0], shift[0].numpy(), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(node["scale"][index, 0], scale[0].numpy(), rtol=2e-3, atol=1e-3)
    assert root[LAYER].attrs["output"] == f"transformer.{LAYER} input, image stream (hidden_states)"
    assert root[LAYER].attrs["modulation"] == f"transformer.{LAYER}.norm (shift_msa, scale_msa)"


def test_forward_stops_before_the_deepest_layer(world, monkeypatch):
    from pipeline.models.backbones.flux import Flux

    calls = {"single.0": 0, "single.1": 0, "single.2": 0}
    original_init = Flux.__init__

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.device.type == "meta":  # the disk check's size estimate
            return
        for k in range(3):
            self.transformer.single_transformer_blocks[k].register_forward_hook(
                lambda m, a, o, k=k: calls.__setitem__(f"single.{k}", calls[f"single.{k}"] + 1))

    monkeypatch.setattr(Flux, "__init__", counting_init)
    params = replace(world["params"], layers=["transformer_blocks.0", LAYER], timesteps=[101, 261])
    extract(params, "x", world["latents"], world["base"] / "count.zarr", replace="any")
    images = len(world["images"])
    assert calls == {"single.0": images * 2, "single.1": 0, "single.2": 0}  # the input of block 1 is captured first


def test_unknown_layer_is_one_line(world, tmp_path):
    with pytest.raises(PipelineError, match=r"layers: unknown layer 'single_transformer_blocks.9' for flux; "
                                            r"available: \[.*'single_transformer_blocks.3'\]") as info:
        extract(replace(world["params"], layers=["single_transformer_blocks.9"]), "x", world["latents"],
                tmp_path / "bad.zarr")
    assert "\n" not in str(info.value)


def test_store_opens_in_xarray_with_labelled_dims(world):
    tree = xr.open_datatree(world["store"], engine="zarr", consolidated=False, chunks={})
    assert set(tree.children) == {"images", "transformer_blocks.1", LAYER}
    layer = tree[LAYER]
    assert layer["features"].dims == ("image", "timestep", "y", "x", "channel")
    assert layer["shift"].dims == layer["scale"].dims == ("image", "timestep", "channel")
    assert list(layer["features"].coords["image"].values) == list(world["images"]["image"])
    assert layer["features"].coords["timestep"].values.tolist() == [261]
    assert layer["features"].coords["y"].values.tolist() == [8.0 + 16 * i for i in range(CANVAS // 16)]
    assert np.isfinite(layer["features"].values).all()
    assert tree["images"]["done"].values.all()
    assert tree.attrs["backbone"] == "flux" and tree.attrs["fingerprint"]


@pytest.mark.parametrize("protocol", ["dift", "geoaware"])
def test_flux_store_matches_with_both_protocols(world, protocol):
    from pipeline.matching.match import match_store

    pairs = load_split(world["root"], "test").pairs
    keys = set(world["images"]["image"])
    usable = pairs[pairs["src_image"].isin(keys) & pairs["trg_image"].isin(keys)]
    identity = usable[usable["src_image"] == usable["trg_image"]]
    assert len(identity) >= 1 and len(usable) > len(identity)
    predictions = match_store(world["store"], usable, protocols=[protocol], transform_specs=["raw", "drop:auto+adaln"])
    assert set(predictions["transform"]) == {"raw", "drop:auto+adaln"}
    assert identity_pairs_scored_exactly(world["store"], predictions[predictions["src_image"] == predictions["trg_image"]])
