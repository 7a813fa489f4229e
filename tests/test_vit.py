"""DINOv2 and CLIP vision baselines: pixel canvases in, patch tokens out, in the same store schema."""

from pathlib import Path

import numpy as np
import pytest

from conftest import identity_pairs_scored_exactly
import torch
import xarray as xr
import zarr

from pipeline.config import BackboneParams, EncoderParams
from pipeline.cache.encode import encode
from pipeline.errors import PipelineError
from pipeline.cache.extract import extract
from pipeline.matching.match import match_store
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny

CANVAS = 112  # 8 x 8 patches of 14 px


@pytest.fixture(scope="module")
def vit_world(tmp_path_factory, demo_root):
    base = tmp_path_factory.mktemp("vit")
    split = load_split(demo_root, "test")
    pixels = encode(EncoderParams(kind="pixels", canvas=CANVAS), split.images, demo_root, base / "pixels.zarr")
    stores = {}
    for kind, tiny, layer in (("dinov2", "tiny-dinov2", "encoder.layer.2"), ("clip", "tiny-clip", "encoder.layers.2")):
        model = make_tiny(tiny, base / tiny)
        params = BackboneParams(kind=kind, model=str(model), latents="pixels", layers=[layer], timesteps=[0],
                                ensemble=1, latent="mean", noise=False)
        stores[kind] = (extract(params, kind, pixels, base / f"{kind}.zarr"), model, layer)
    return {"split": split, "pixels": pixels, "stores": stores}


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_patch_tokens_equal_direct_transformers_call(vit_world, kind):
    from transformers import CLIPVisionModel, Dinov2Model

    path, model_dir, layer = vit_world["stores"][kind]
    model = (Dinov2Model if kind == "dinov2" else CLIPVisionModel).from_pretrained(model_dir)
    canvas = zarr.open_group(vit_world["pixels"], mode="r")["posterior/mean"][3]  # (y, x, 3) in [-1, 1]
    mean, std = {"dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}[kind]
    pixels = ((torch.from_numpy(canvas).permute(2, 0, 1) + 1) / 2 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        hidden = model(pixel_values=pixels[None], output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    expected = hidden[3][0, 1:].reshape(8, 8, -1).numpy()  # hidden_states[0] is the embeddings; drop CLS
    stored = zarr.open_group(path, mode="r")[f"{layer}/features"][3, 0].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
@pytest.mark.parametrize("protocol", ["dift", "geoaware"])
def test_store_schema_and_matching(vit_world, kind, protocol):
    path, _, layer = vit_world["stores"][kind]
    tree = xr.open_datatree(path, engine="zarr")
    assert tree[layer]["features"].dims == ("image", "timestep", "y", "x", "channel")
    pairs = vit_world["split"].pairs
    identity = pairs[pairs["src_image"] == pairs["trg_image"]]
    assert identity_pairs_scored_exactly(path, match_store(path, identity, protocols=[protocol]))


def test_pixel_backbones_need_a_pixels_encoder(vit_world, tiny_models, demo_root, tmp_path):
    _, model, layer = vit_world["stores"]["dinov2"]
    latents = encode(EncoderParams(model=tiny_models["tiny-sd2"], canvas=CANVAS), vit_world["split"].images.head(2),
                     demo_root, tmp_path / "vae.zarr")
    params = BackboneParams(kind="dinov2", model=str(model), latents="vae", layers=[layer], noise=False, ensemble=1)
    with pytest.raises(PipelineError, match=r"dinov2 needs an encoder with `kind: pixels`"):
        extract(params, "d", latents, tmp_path / "d.zarr")


def test_the_pixels_store_keeps_the_canvas_exactly_as_bytes(vit_world, demo_root):
    from pipeline.cache.encode import load_canvas

    split = vit_world["split"]
    posterior = zarr.open_group(vit_world["pixels"], mode="r")["posterior"]
    for index in (0, 5):
        path = Path(demo_root) / split.images["path"].iloc[index]
        expected = load_canvas(path, CANVAS, "squash").permute(1, 2, 0).numpy()
        assert np.array_equal(posterior["mean"][index], expected)  # bit for bit, float32
        assert not posterior["std"][index].any()
    # Both arrays hold one byte a value before compression: the canvas is v / 127.5 - 1 for bytes v.
    for name in ("mean", "std"):
        filters = posterior[name].metadata.codecs[0].to_dict()
        assert filters["configuration"]["astype"] == "|u1", filters
    assert len(np.unique(posterior["mean"][0])) > 200  # a real image's range, not a flat canvas
