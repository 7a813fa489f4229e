"""Edit propagation from cache: the edit lands where the demo's exact transform puts it.

Acceptance: "Edit propagation places the edit's centre within 3 px of the known transform on a demo
pair". The demo stores (`demo_stores`: 128-px canvas, latents *sampled* from the tiny random VAE's
posterior, whose std is ~1 against a mean of ~0.25) are dominated by sampling noise, so no store or
layer there matches warped pairs (0-2% of stickers within 3 px); they are only used for the identity
sanity check and the mechanics. The criterion is checked on the same demo pairs with the tiny SD3
VAE's posterior *mean* latents at a 256-px canvas (a `vae-sd3` store, `latent: mean`), built here in a
few seconds from the session's tiny models.
"""

import json

import cv2
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.matching.protocols import FeatureMap
from pipeline.data.images import read_rgb as load_image, read_rgba as load_rgba, save_image
from pipeline.matching.propagate import apply_homography, propagate

SIMILARITY_PAIR = "000019-demo_10100-demo_10101:blob"  # rotation 1.7 deg, scale 0.91
AFFINE_PAIR = "000020-demo_10100-demo_10102:blob"


@pytest.fixture(scope="module")
def mean_store(tmp_path_factory, demo_stores, tiny_models):
    """vae-sd3 features from the tiny SD3 VAE's posterior mean on a 256-px canvas, over the demo test split."""
    from pipeline.config import BackboneParams, EncoderParams
    from pipeline.cache.encode import encode
    from pipeline.cache.extract import extract
    from pipeline.matching.maps import StoreMaps

    base = tmp_path_factory.mktemp("propagate")
    latents = encode(EncoderParams(model=tiny_models["tiny-sd3"], canvas=256), demo_stores["images"],
                     demo_stores["root"], base / "latents-tiny-sd3-256.zarr")
    params = BackboneParams(kind="vae-sd3", model=tiny_models["tiny-sd3"], latents="tiny-sd3", layers=["latent"],
                            timesteps=[261], ensemble=1, noise=False, latent="mean")
    return StoreMaps(extract(params, "vae-sd3-mean256", latents, base / "vae-sd3-mean256.zarr"))


def _pair(demo_stores, name):
    pairs = demo_stores["pairs"]
    row = pairs[pairs["filename"] == name].iloc[0]
    root = demo_stores["root"]
    transform = json.loads((root / "DemoTransforms.json").read_text())[f"test/{name}"]
    src = load_image(root / "JPEGImages" / f"{row.src_image}.jpg")
    trg = load_image(root / "JPEGImages" / f"{row.trg_image}.jpg")
    return row, transform, src, trg


def _sticker(shape, centre, radius=12, colour=(255, 0, 255)):
    edit = np.zeros((*shape[:2], 4), np.uint8)
    cv2.circle(edit, (int(centre[0]), int(centre[1])), radius, (*colour, 255), -1)
    return edit


def _errors(maps, demo_stores, name, keypoints=None):
    row, transform, src, trg = _pair(demo_stores, name)
    matrix = np.array(transform["matrix"])
    layer, timestep = maps.layers[0], maps.timesteps[0]
    found = []
    for k in keypoints if keypoints is not None else range(len(row.src_kps)):
        edit = _sticker(src.shape, row.src_kps[k])
        composite, homography, info = propagate(maps, layer, timestep, row.src_image, row.trg_image, src, trg, edit)
        truth = apply_homography(matrix, np.array([info["source_centre"]]))[0]
        found.append((np.hypot(*(np.array(info["centre"]) - truth)),
                      np.hypot(*(np.array(info["warped_centre"]) - truth)), composite, homography, info))
    return found, transform["kind"]


@pytest.mark.parametrize("name, kind", [(SIMILARITY_PAIR, "similarity"), (AFFINE_PAIR, "affine")])
def test_edit_centre_within_3px_of_known_transform(demo_stores, mean_store, name, kind):
    found, actual_kind = _errors(mean_store, demo_stores, name)
    assert actual_kind == kind
    centre_errors = np.array([f[0] for f in found])
    warped_errors = np.array([f[1] for f in found])
    # A 24-px disc on the object's centre keypoint (the last one): the acceptance criterion.
    assert centre_errors[-1] <= 3.0 and warped_errors[-1] <= 3.0, (centre_errors, warped_errors)
    # ...and on every keypoint of the pair: the similarity pair all within 3 px (measured max 2.4), the
    # affine one all but one (measured max 3.1), none far off.
    assert (centre_errors <= 3.0).sum() >= len(found) - (kind == "affine"), centre_errors
    assert np.median(centre_errors) <= 2.0 and centre_errors.max() <= 4.0, centre_errors
    assert np.median(warped_errors) <= 2.0 and warped_errors.max() <= 4.0, warped_errors
    for _, _, composite, homography, info in found:
        assert composite.dtype == np.uint8 and homography.shape == (3, 3)
        assert info["inliers"] >= 4 and info["matches"] >= info["inliers"]


def test_composite_pastes_only_the_warped_edit(demo_stores, mean_store):
    row, _, src, trg = _pair(demo_stores, SIMILARITY_PAIR)
    edit = _sticker(src.shape, row.src_kps[-1], colour=(255, 0, 255))
    composite, homography, info = propagate(mean_store, "latent", mean_store.timesteps[0], row.src_image,
                                            row.trg_image, src, trg, edit)
    assert composite.shape == trg.shape
    coverage = cv2.warpPerspective(edit[..., 3], homography, (trg.shape[1], trg.shape[0]))
    untouched = cv2.dilate((coverage > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    np.testing.assert_array_equal(composite[untouched], trg[untouched])
    inside = cv2.erode((coverage == 255).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert inside.sum() > 200
    np.testing.assert_array_equal(composite[inside], np.array([255, 0, 255], np.uint8)[None].repeat(inside.sum(), 0))


def test_identity_pair_on_demo_store(demo_stores):
    """The demo's own tiny-sd3 store: on an identity pair the edit stays where it is (every layer)."""
    from pipeline.matching.maps import StoreMaps

    maps = StoreMaps(demo_stores["stores"]["tiny-sd3"])
    row, _, src, trg = _pair(demo_stores, "000018-demo_10100-demo_10100:blob")
    edit = _sticker(src.shape, row.src_kps[0])
    for layer in maps.layers:
        _, homography, info = propagate(maps, layer, maps.timesteps[0], row.src_image, row.trg_image, src, trg, edit)
        assert np.hypot(*(np.array(info["centre"]) - info["source_centre"])) <= 1.0, (layer, info)


class _Stub:
    """The part of StoreMaps propagate uses, with chosen feature maps."""

    def __init__(self, source: np.ndarray, target: np.ndarray, size):
        self.path, self.layers, self.timesteps = "stub.zarr", ["latent"], [0]
        self.maps = {"a": source, "b": target}
        self.size = size

    def check_images(self, keys):
        pass

    def check_variant(self, layer, timestep):
        pass

    def load(self, key, layer, timestep):
        width, height = self.size
        return FeatureMap(self.maps[key], width, height, 64.0, 64.0, 8.0)


@pytest.mark.parametrize("mutual", [True, False])
def test_no_valid_matches_is_one_line_error(mutual):
    rng = np.random.default_rng(0)
    size = (64, 64)
    # A featureless target: every query's cosine map is flat, all matches collapse onto one pixel.
    stub = _Stub(rng.normal(size=(8, 8, 16)).astype(np.float32), np.ones((8, 8, 16), np.float32), size)
    image = np.zeros((64, 64, 3), np.uint8)
    edit = _sticker(image.shape, (32, 32), radius=6)
    with pytest.raises(PipelineError) as caught:
        propagate(stub, "latent", 0, "a", "b", image, image, edit, mutual=mutual)
    message = str(caught.value)
    assert "\n" not in message and "a -> b" in message and "edit" in message


def test_empty_mask_and_bad_edit_are_one_line_errors(demo_stores, tmp_path):
    from pipeline.matching.maps import StoreMaps

    maps = StoreMaps(demo_stores["stores"]["vae-sd3"])
    row, _, src, trg = _pair(demo_stores, SIMILARITY_PAIR)
    empty = np.zeros((*src.shape[:2], 4), np.uint8)
    with pytest.raises(PipelineError, match="mask is empty") as caught:
        propagate(maps, "latent", maps.timesteps[0], row.src_image, row.trg_image, src, trg, empty)
    assert "\n" not in str(caught.value)
    with pytest.raises(PipelineError, match="source's size"):
        propagate(maps, "latent", maps.timesteps[0], row.src_image, row.trg_image, src, trg, empty[:10])
    with pytest.raises(PipelineError, match="no image"):
        propagate(maps, "latent", maps.timesteps[0], "blob/nope", row.trg_image, src, trg, empty)

    garbage = tmp_path / "edit.png"
    garbage.write_bytes(b"not a png")
    with pytest.raises(PipelineError, match="unreadable image") as caught:
        load_rgba(garbage)
    assert "\n" not in str(caught.value)
    save_image(tmp_path / "rgb.png", src)
    with pytest.raises(PipelineError, match="alpha"):
        load_rgba(tmp_path / "rgb.png")
    save_image(tmp_path / "rgba.png", _sticker(src.shape, (20, 20)))
    assert load_rgba(tmp_path / "rgba.png").shape == (*src.shape[:2], 4)


def test_cli_propagate(demo_stores, mean_store, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from cli import cli

    pairs = demo_stores["pairs"]
    row = pairs[pairs["filename"] == "000019-demo_10100-demo_10101:blob"].iloc[0]
    root = demo_stores["root"]
    src, trg = (root / "JPEGImages" / row["category"] / row[f"{side}_imname"] for side in ("src", "trg"))
    sticker = np.zeros((row["src_height"], row["src_width"], 4), np.uint8)
    x, y = row["src_kps"][0]
    sticker[max(y - 8, 0): y + 8, max(x - 8, 0): x + 8] = (255, 0, 0, 255)
    Image.fromarray(sticker).save(tmp_path / "edit.png")
    args = ["propagate", "--store", str(mean_store.path), "--src", str(src), "--trg", str(trg),
            "--edit", str(tmp_path / "edit.png"), "--out", str(tmp_path / "out.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (row["trg_width"], row["trg_height"])
    (tmp_path / "edit.png").write_bytes(b"not a png")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.output.startswith(f"error: {tmp_path / 'edit.png'}: unreadable image")
