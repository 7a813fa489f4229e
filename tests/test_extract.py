"""Feature extraction against independent computations, determinism, resume, and the store contract."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from pipeline.cache.store import FeatureStore
from pipeline.config import BackboneParams
from pipeline.config import EncoderParams
from pipeline.cache.encode import encode, load_canvas
from pipeline.errors import PipelineError
from pipeline.cache.extract import extract
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny
from conftest import store_files

CANVAS = 128
SD2 = BackboneParams(kind="sd2", model="", latents="", layers=["up_blocks.0", "up_blocks.1", "up_blocks.3"],
                     timesteps=[101, 261], ensemble=2)
SD3 = BackboneParams(kind="sd3", model="", latents="", layers=["transformer_blocks.1", "transformer_blocks.3"],
                     timesteps=[261], ensemble=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_root):
    """Tiny models, 6 demo images, and their latents stores at a 128-px canvas."""
    base = tmp_path_factory.mktemp("extract")
    images = load_split(demo_root, "test").images.iloc[:6].reset_index(drop=True)
    out = {"base": base, "images": images, "root": demo_root}
    for family in ("sd2", "sd3"):
        model = make_tiny(f"tiny-{family}", base / f"tiny-{family}")
        latents = encode(EncoderParams(model=str(model), canvas=CANVAS), images, demo_root, base / f"latents-{family}.zarr")
        out[family] = (str(model), latents)
    return out


def _params(world, template, **changes):
    model, latents = world[template.kind[-3:]]
    return replace(template, model=model, latents=str(latents), **changes), latents


def _run(world, template, out, replace="never", **changes):
    params, latents = _params(world, template, **changes)
    return extract(params, template.kind, latents, out, replace=replace)


def _canvas(world, index):
    row = world["images"].iloc[index]
    return load_canvas(Path(world["root"]) / row["path"], CANVAS, "squash")


def test_sd2_up_block_equals_direct_diffusers_computation(world, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = _run(world, SD2, tmp_path / "s.zarr", latent="mean", noise=False, ensemble=1, timesteps=[261])
    pipe = StableDiffusionPipeline.from_pretrained(world["sd2"][0], safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    index = 4
    category = world["images"]["category"].iloc[index]
    with torch.no_grad():
        latent = pipe.vae.encode(_canvas(world, index)[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(f"a photo of a {category}", padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
        captured = {}
        hook = pipe.unet.up_blocks[1].register_forward_hook(lambda m, a, o: captured.update(x=o))
        pipe.unet(latent, torch.tensor([261]), encoder_hidden_states=embeds)
        hook.remove()
    expected = captured["x"][0].permute(1, 2, 0).numpy()
    stored = zarr.open_group(out, mode="r")["up_blocks.1/features"][index, 0].astype(np.float32)
    assert stored.shape == (CANVAS // 16, CANVAS // 16, expected.shape[-1])
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_sd3_block_equals_direct_transformer_call(world, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = _run(world, SD3, tmp_path / "s.zarr", latent="mean", noise=False, ensemble=1)
    pipe = StableDiffusion3Pipeline.from_pretrained(world["sd3"][0], text_encoder_3=None, tokenizer_3=None)
    index = 2
    category = world["images"]["category"].iloc[index]
    with torch.no_grad():
        vae = pipe.vae
        latent = (vae.encode(_canvas(world, index)[None]).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(f"a photo of a {category}", None, None, do_classifier_free_guidance=False)
        captured = {}
        blocks = pipe.transformer.transformer_blocks
        hook = blocks[1].register_forward_hook(lambda m, a, o: captured.update(x=o[1]))
        pipe.transformer(hidden_states=latent, timestep=torch.tensor([261.0]), encoder_hidden_states=embeds,
                         pooled_projections=pooled, return_dict=False)
        hook.remove()
        temb = pipe.transformer.time_text_embed(torch.tensor([261.0]), pooled)
        shift, scale = blocks[2].norm1.linear(torch.nn.functional.silu(temb)).chunk(6, dim=1)[:2]
    grid = CANVAS // 16
    expected = captured["x"][0].reshape(grid, grid, -1).numpy()
    node = zarr.open_group(out, mode="r")["transformer_blocks.1"]
    stored = node["features"][index, 0].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(node["shift"][index, 0], shift[0].numpy(), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(node["scale"][index, 0], scale[0].numpy(), rtol=2e-3, atol=1e-3)


@pytest.mark.slow
def test_same_seed_same_store_and_resume_converges(world, tmp_path, monkeypatch):
    first = _run(world, SD2, tmp_path / "a.zarr")
    second = _run(world, SD2, tmp_path / "b.zarr")
    assert store_files(first) == store_files(second)
    other = _run(world, SD2, tmp_path / "c.zarr", seed=1)
    assert store_files(other)["up_blocks.1/features/c/0/0/0/0/0"] != store_files(first)["up_blocks.1/features/c/0/0/0/0/0"]

    # Interrupt: image 3's features are written, then the process dies before its flag. Inside Zarr: a
    # replaced pipeline function (FeatureStore.mark_done) would be code of its own, and the store another's to resume.
    calls = {"n": 0}
    original = zarr.Array.__setitem__

    def dying(array, selection, value):
        if array.path == "images/done" and value is True:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        original(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(world, SD2, tmp_path / "r.zarr")
    monkeypatch.setattr(zarr.Array, "__setitem__", original)
    partial = FeatureStore.open(tmp_path / "r.zarr")
    assert partial.done_mask().tolist() == [True, True, True, False, False, False]
    before = partial["images/seconds"][:3].copy()

    _run(world, SD2, tmp_path / "r.zarr")
    resumed = FeatureStore.open(tmp_path / "r.zarr")
    assert resumed.done_mask().all()
    np.testing.assert_array_equal(resumed["images/seconds"][:3], before)  # finished images untouched
    assert store_files(tmp_path / "r.zarr") == store_files(first)


def test_other_parameters_are_refused_unless_overwrite(world, tmp_path):
    path = _run(world, SD2, tmp_path / "s.zarr", layers=["up_blocks.1"])
    with pytest.raises(PipelineError, match=r"s.zarr: fingerprint: store was built with other parameters, model or code \(seed: 0 -> 7\)"):
        _run(world, SD2, path, layers=["up_blocks.1"], seed=7)
    assert FeatureStore.open(path).done_mask().all()  # nothing lost
    _run(world, SD2, path, layers=["up_blocks.1"], seed=7, replace="any")
    assert zarr.open_group(path, mode="r").attrs["seed"] == 7


def test_store_opens_in_xarray_with_labelled_dims(world, tmp_path):
    path = _run(world, SD3, tmp_path / "s.zarr")
    tree = xr.open_datatree(path, engine="zarr", consolidated=False, chunks={})
    assert set(tree.children) == {"images", "transformer_blocks.1", "transformer_blocks.3"}
    layer = tree["transformer_blocks.3"]
    assert layer["features"].dims == ("image", "timestep", "y", "x", "channel")
    assert layer["shift"].dims == ("image", "timestep", "channel")
    assert list(layer["features"].coords["image"].values) == list(world["images"]["image"])
    assert layer["features"].coords["timestep"].values.tolist() == [261]
    assert layer["features"].coords["y"].values.tolist() == [8.0 + 16 * i for i in range(CANVAS // 16)]
    one = layer["features"].sel(image=world["images"]["image"].iloc[0], timestep=261)
    assert one.shape == (8, 8, 32) and np.isfinite(one.values).all()
    assert tree["images"]["done"].values.all()
    assert tree.attrs["backbone"] == "sd3" and tree.attrs["fingerprint"]


def test_vae_latents_are_the_scaled_posterior(world, tmp_path):
    model, latents = world["sd3"]
    params = BackboneParams(kind="vae-sd3", model=model, latents=str(latents), layers=["latent"], timesteps=[0],
                            ensemble=1, latent="mean", noise=False)
    path = extract(params, "vae-sd3", latents, tmp_path / "v.zarr")
    source = zarr.open_group(latents, mode="r")
    attrs = source.attrs
    expected = (source["posterior/mean"][1] - attrs["shift_factor"]) * attrs["scaling_factor"]
    stored = zarr.open_group(path, mode="r")["latent/features"][1, 0].astype(np.float32)
    assert stored.shape == (CANVAS // 8, CANVAS // 8, 16)
    np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-3)


def test_bad_layer_and_unloadable_model_are_one_line(world, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match=r"layers: unknown layer 'up_blocks.9' for sd2; available: \[.*'mid_block'"):
        _run(world, SD2, tmp_path / "s.zarr", layers=["up_blocks.9"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"stabilityai/stable-diffusion-2-1: cannot load model_index.json: "
                                            r"not a local folder and not in the Hugging Face cache") as info:
        extract(replace(SD2, model="stabilityai/stable-diffusion-2-1"), "x", world["sd2"][1], tmp_path / "h.zarr")
    assert "\n" not in str(info.value) and "HF_HOME" in str(info.value)


def test_cli_encode_extract_info(world, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from cli import cli

    monkeypatch.chdir(tmp_path)
    world["images"].to_parquet(tmp_path / "images.parquet")
    model = world["sd2"][0]
    params = {
        "data": {"root": str(world["root"]), "images": "images.parquet"},
        "encoders": {"e": {"model": model, "canvas": CANVAS}},
        "backbones": {"b": {"kind": "sd2", "model": model, "latents": "e", "layers": ["up_blocks.1"], "ensemble": 1}},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    assert runner.invoke(cli, ["encode", "--encoder", "e"]).exit_code == 0
    result = runner.invoke(cli, ["extract", "--backbone", "b", "--store", "b.zarr"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["info", "--store", "b.zarr"])
    assert result.exit_code == 0
    assert "images: 6/6 done" in result.output
    assert "up_blocks.1: image=6 x timestep=1 x y=8 x x=8 x channel=32" in result.output
    assert "timesteps: 261" in result.output

    params["backbones"]["b"]["timesteps"] = [500]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(cli, ["extract", "--backbone", "b", "--store", "b.zarr"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: b.zarr: fingerprint: store was built with other parameters, model or code (timesteps: [261] -> [500]); "
        "pass --overwrite to rebuild it or choose another --store"]
    result = runner.invoke(cli, ["extract", "--backbone", "nope"])
    assert result.exit_code == 2 and "backbones: unknown name 'nope'" in result.output


def test_one_forward_per_timestep_stops_after_deepest_layer(world, tmp_path, monkeypatch):
    from pipeline.models.backbones import sd2
    from pipeline.models.backbones.parts import Parts

    calls = {"up_blocks.0": 0, "up_blocks.1": 0, "up_blocks.2": 0, "text": 0}
    original_load, original_component = sd2.SD2.load_model, Parts.component

    def counting_load(self):
        original_load(self)
        if self.device.type != "meta":  # not the size estimate of the disk check
            for name in ("up_blocks.0", "up_blocks.1", "up_blocks.2"):
                module = dict(self.unet.named_modules())[name]
                module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))

    def counting_component(self, name):
        part = original_component(self, name)
        if name == "text_encoder" and self.device.type != "meta":
            part.register_forward_hook(lambda m, a, o: calls.__setitem__("text", calls["text"] + 1))
        return part

    monkeypatch.setattr(sd2.SD2, "load_model", counting_load)
    monkeypatch.setattr(Parts, "component", counting_component)
    _run(world, SD2, tmp_path / "s.zarr", layers=["up_blocks.1", "up_blocks.0"], timesteps=[101, 261, 501], ensemble=3)
    images = len(world["images"])
    assert calls["up_blocks.0"] == calls["up_blocks.1"] == images * 3  # one batched forward per (image, timestep)
    assert calls["up_blocks.2"] == 0  # nothing after the deepest requested layer runs
    assert calls["text"] == world["images"]["category"].nunique()  # prompts encoded once per category


def test_pad_canvas_records_the_valid_region(world, tmp_path):
    model = world["sd2"][0]
    path = encode(EncoderParams(model=model, canvas=CANVAS, canvas_mode="pad"), world["images"], world["root"],
                  tmp_path / "pad.zarr")
    table = FeatureStore.open(path).images()
    for _, row in table.iterrows():
        scale = CANVAS / max(row["width"], row["height"])
        assert (row["valid_x1"], row["valid_y1"]) == (round(row["width"] * scale), round(row["height"] * scale))
        assert max(row["valid_x1"], row["valid_y1"]) == CANVAS
    canvas = load_canvas(Path(world["root"]) / world["images"]["path"].iloc[1], CANVAS, "pad")
    w, h = int(table["valid_x1"].iloc[1]), int(table["valid_y1"].iloc[1])
    assert (canvas[:, h:, :] == 0).all() and (canvas[:, :, w:] == 0).all()


def test_model_identity_tells_reinitialised_weights_apart(tmp_path):
    from pipeline.cache.provenance import model_identity

    a, b, c = (make_tiny("tiny-sd2", tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert model_identity(str(a)) == model_identity(str(b)) != model_identity(str(c))
    assert model_identity("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"


def test_a_half_precision_vae_that_gives_nan_encodes_that_image_in_float32(world):
    """The SD-family VAEs can overflow in float16; such an image is encoded again in float32. Here a
    bfloat16 VAE is made to give NaN (as an overflow would) and the result must be the float32 encoding."""
    from diffusers import AutoencoderKL

    from pipeline.cache.encode import posterior

    model = world["sd3"][0]
    pixels = _canvas(world, 1)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.bfloat16).eval()
    upcast = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.bfloat16).to(torch.float32).eval()
    reference = posterior(upcast, pixels, torch.device("cpu"), torch.float32)  # the same (rounded) weights
    vae.encoder.register_forward_hook(lambda m, a, out: out * np.nan if out.dtype == torch.bfloat16 else out)
    mean, std = posterior(vae, pixels, torch.device("cpu"), torch.bfloat16)
    np.testing.assert_array_equal(mean, reference[0])
    np.testing.assert_array_equal(std, reference[1])
    assert vae.dtype == torch.bfloat16  # put back for the next image


def test_values_beyond_float16_are_clipped_and_counted_never_inf(world, tmp_path, monkeypatch):
    from pipeline.cache.describe import describe
    from pipeline.models.backbones.vae import VAELatent

    real_run = VAELatent.run
    monkeypatch.setattr(VAELatent, "run", lambda self, x, t, category: {
        "latent": {"features": real_run(self, x, t, category)["latent"]["features"] * 1e5}})
    model, latents = world["sd3"]
    params = BackboneParams(kind="vae-sd3", model=model, latents=str(latents), layers=["latent"], timesteps=[0],
                            ensemble=1, latent="mean", noise=False)
    path = extract(params, "vae-sd3", latents, tmp_path / "v.zarr")
    source, root = zarr.open_group(latents, mode="r"), zarr.open_group(path, mode="r")
    clipped = kept = 0
    for index in range(len(world["images"])):
        expected = (source["posterior/mean"][index] - source.attrs["shift_factor"]) * source.attrs["scaling_factor"] * 1e5
        clipped, kept = clipped + (np.abs(expected) > 65504).sum(), kept + (np.abs(expected) <= 65504).sum()
        stored = root["latent/features"][index, 0]
        assert np.isfinite(stored).all()
        np.testing.assert_array_equal(stored, np.clip(expected, -65504, 65504).astype(np.float16))
        assert root["latent/overflow"][index, 0] == int((np.abs(expected) > 65504).sum())
    assert clipped > 0 and kept > 0  # both regimes are exercised
    assert FeatureStore.open(path).overflow() == {"latent": int(root["latent/overflow"][:].sum())}
    assert "values clipped to float16's range (+-65504): latent " in describe(path)


def test_offloading_the_denoiser_block_by_block_gives_the_same_store(world, tmp_path):
    plain = _run(world, SD3, tmp_path / "plain.zarr")
    offloaded = _run(world, SD3, tmp_path / "offloaded.zarr", offload="blocks")
    assert store_files(plain) == store_files(offloaded)  # where the weights live is not in the fingerprint


def test_extract_refuses_a_store_that_cannot_fit_on_its_disk(world, tmp_path, monkeypatch):
    from pipeline.cache import sizes as plan

    monkeypatch.setattr(plan, "disk_free", lambda path: 999)
    out = tmp_path / "s.zarr"
    with pytest.raises(PipelineError) as info:
        _run(world, SD2, out)
    # up_blocks.0/1/3 of tiny SD2 at 128 px: 4x4x32, 8x8x32, 16x16x8 in fp16, 2 timesteps, + an int64 count each
    per_image = 2 * 2 * (4 * 4 * 32 + 8 * 8 * 32 + 16 * 16 * 8) + 2 * 3 * 8
    assert str(info.value) == (f"{out}: disk: 6 images need {plan.human(6 * per_image)} (uncompressed) but 999 B are "
                               "free there; free space, point `store:` elsewhere, or set `check_disk: false` to start anyway")
    assert not out.exists()
    model, latents = world["sd2"]
    extract(replace(SD2, model=model, latents=str(latents)), "sd2", latents, out, check_disk=False)
    assert FeatureStore.open(out).done_mask().all()


def test_the_disk_check_counts_every_image_of_a_store_it_would_replace(world, tmp_path, monkeypatch):
    """A finished store built with other parameters is no head start: the rebuild needs room for every
    image, and when there is none the old store is left as it is."""
    from pipeline.cache import sizes as plan

    out = tmp_path / "s.zarr"
    _run(world, SD2, out, layers=["up_blocks.0"])
    before = store_files(out)
    monkeypatch.setattr(plan, "disk_free", lambda path: 30_000)  # more than one image of up_blocks.0, less than 6 of 3 layers
    with pytest.raises(PipelineError, match=r"disk: 6 images need"):
        _run(world, SD2, out, replace="any")
    assert store_files(out) == before
