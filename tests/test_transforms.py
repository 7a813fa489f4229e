"""DiT fixes at match time: planted massive channels break raw matching; drop:auto+adaln recovers it."""

import json
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.cache.store import FeatureStore
from pipeline.matching import transforms
from pipeline.errors import PipelineError
from pipeline.matching.match import match_store
from pipeline.evaluation.metrics import pck_table
from pipeline.data.spair import load_split

CANVAS, GRID, CHANNELS, MASSIVE = 128, 16, 48, (7, 12, 30, 41)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, demo_root):
    """A store written through the documented schema (as another tool would): every image's features
    are a smooth random field of its source object's coordinates (so warped targets truly correspond),
    plus four massive channels of per-cell noise (token-dependent, as in diffusion transformers: a
    constant massive offset alone would not move the argmax), plus a stored AdaLN modulation."""
    split = load_split(demo_root, "test")
    warps = json.loads((demo_root / "DemoTransforms.json").read_text())
    origin = {}  # image -> (source image, source->image homography)
    for pair in split.pairs.itertuples():
        warp = warps[f"test/{pair.filename}"]
        if warp["kind"] != "instance":
            origin[pair.trg_image] = (pair.src_image, np.array(warp["matrix"]))
            origin.setdefault(pair.src_image, (pair.src_image, np.eye(3)))
    images = split.images[split.images["image"].isin(origin)].reset_index(drop=True)
    table = images.assign(valid_x0=0.0, valid_y0=0.0, valid_x1=float(CANVAS), valid_y1=float(CANVAS))
    path = tmp_path_factory.mktemp("planted") / "planted.zarr"
    written = FeatureStore.create(path, {"kind": "features", "name": "planted", "determinants": {"test": 1}},
                                  table, [500], replace="never")
    stride = CANVAS / GRID
    node = written.ensure_layer("transformer_blocks.5",
                                {"features": (("timestep", "y", "x", "channel"), (1, GRID, GRID, CHANNELS)),
                                 "shift": (("timestep", "channel"), (1, CHANNELS)),
                                 "scale": (("timestep", "channel"), (1, CHANNELS))},
                                {"y": (np.arange(GRID) + 0.5) * stride, "x": (np.arange(GRID) + 0.5) * stride,
                                 "channel": np.arange(CHANNELS)}, {"stride": stride})
    rng = np.random.default_rng(0)
    modulation = 0.1 * rng.standard_normal((2, CHANNELS))
    centres = (np.arange(GRID) + 0.5) * stride
    for index, row in images.iterrows():
        source, matrix = origin[row["image"]]
        source_row = split.images.set_index("image").loc[source]
        field = np.random.default_rng(zlib.crc32(source.encode()))
        freq, phase = field.uniform(0.5, 3.0, (CHANNELS, 2)), field.uniform(0, 2 * np.pi, CHANNELS)
        x, y = np.meshgrid(centres * row["width"] / CANVAS, centres * row["height"] / CANVAS)
        back = np.linalg.inv(matrix) @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
        u, v = back[0] / back[2] / source_row["width"], back[1] / back[2] / source_row["height"]
        features = np.sin(2 * np.pi * (np.outer(u, freq[:, 0]) + np.outer(v, freq[:, 1])) + phase)
        noise = np.random.default_rng(1000 + index).standard_normal((GRID * GRID, len(MASSIVE)))
        features[:, MASSIVE] = 300.0 * noise
        node["features"][index] = features.reshape(1, GRID, GRID, CHANNELS).astype(np.float16)
        node["shift"][index], node["scale"][index] = modulation[:1], modulation[1:]
        written.mark_done(index, 0.0, 0)
    kinds = split.pairs["filename"].map(lambda name: warps[f"test/{name}"]["kind"])
    pairs = split.pairs[~kinds.isin(["instance", "identity"])]
    return path, pairs


def _pck(predictions, spec):
    table = pck_table(predictions[predictions["transform"] == spec])
    return table[(table["kind"] == "per_image") & (table["category"] == "all") & (table["alpha"] == 0.1)]["pck"].item()


def test_massive_channels_break_raw_and_ditf_recovers(planted):
    path, pairs = planted
    assert len(pairs) == 24
    predictions = match_store(path, pairs, transform_specs=["raw", "layernorm", "drop:auto+adaln", "drop:7,12,30,41+layernorm"])
    assert _pck(predictions, "raw") < 0.3
    assert _pck(predictions, "layernorm") < 0.3  # normalising alone keeps the massive channels dominant
    assert _pck(predictions, "drop:auto+adaln") > 0.9
    assert _pck(predictions, "drop:7,12,30,41+layernorm") > 0.9
    detected = predictions.loc[predictions["transform"] == "drop:auto+adaln", "dropped_channels"].unique()
    assert detected.tolist() == ["7,12,30,41"]


def test_transform_steps():
    x = np.random.default_rng(0).standard_normal((4, 5, 16)).astype(np.float32)
    x[..., 3] *= 1000
    assert transforms.massive_channels(transforms.channel_magnitudes(x)) == (3,)
    normed = transforms.apply(transforms.parse("layernorm"), x)
    np.testing.assert_allclose(normed.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(normed.std(-1), 1, atol=1e-3)
    shift, scale = np.full(16, 0.5, np.float32), np.full(16, 1.0, np.float32)
    np.testing.assert_allclose(transforms.apply(transforms.parse("adaln"), x, shift=shift, scale=scale),
                               2 * normed + 0.5, atol=1e-5)
    dropped = transforms.apply(transforms.parse("drop:auto"), x, auto_channels=(3,))
    assert (dropped[..., 3] == 0).all() and (dropped[..., 2] == x[..., 2]).all()
    assert transforms.parse("raw") == ()


@pytest.mark.parametrize("spec, message", [("blur", "unknown transform 'blur'"), ("drop:a,b", "bad channel list"),
                                           ("drop:-1", "negative channel in 'drop:-1'"), ("drop:3,-0,-2", "negative channel")])
def test_bad_transform_is_one_line(spec, message):
    with pytest.raises(PipelineError, match=message):
        transforms.parse(spec)


def test_adaln_needs_a_transformer_block(demo_stores):
    with pytest.raises(PipelineError, match=r"up_blocks.1: transform adaln: adaln needs the stored shift/scale"):
        match_store(demo_stores["stores"]["tiny-sd2"], demo_stores["pairs"].head(2), transform_specs=["adaln"])


def test_cli_inspect_reports_massive_channels(planted):
    path, _ = planted
    result = CliRunner().invoke(cli, ["inspect", "--store", str(path), "--layer", "transformer_blocks.5"])
    assert result.exit_code == 0, result.output
    assert "massive channels (drop:auto): [7, 12, 30, 41]" in result.output
    lines = result.output.splitlines()
    assert {line.split()[0] for line in lines[2:6]} == {"7", "12", "30", "41"}


@pytest.mark.parametrize("spec, written", [("raw", "raw"), (" raw ", "raw"), ("raw+raw", "raw"),
                                           ("drop:03,1,3", "drop:1,3"), ("drop:auto + adaln", "drop:auto+adaln"),
                                           ("layernorm+drop:0", "layernorm+drop:0")])
def test_each_transform_has_one_spelling(spec, written):
    assert transforms.canonical(spec) == written
    assert transforms.parse(written) == transforms.parse(spec)


def test_match_names_a_transform_by_its_one_spelling(demo_stores):
    pairs = demo_stores["pairs"].head(2)
    for spec, message in (("drop:01", "transform: 'drop:01' is spelled 'drop:1'"), ("drop:-2", "negative channel in 'drop:-2'"),
                          ("drop:auto + adaln", "'drop:auto \\+ adaln' is spelled 'drop:auto\\+adaln'")):
        with pytest.raises(PipelineError, match=message):
            match_store(demo_stores["stores"]["tiny-sd3"], pairs, transform_specs=["raw", spec])
