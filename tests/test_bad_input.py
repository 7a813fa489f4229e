"""The bad-input catalogue: each fault gives one line naming the file, field and reason; under
`on_error: skip` the item is left out and listed; nothing already cached is lost or corrupted."""

import errno
import json
from pathlib import Path
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import store_files
from pipeline.cache.store import FeatureStore
from pipeline.config import BackboneParams, EncoderParams, load_params
from pipeline.cache.encode import encode, load_canvas
from pipeline.errors import PipelineError
from pipeline.cache.extract import extract
from pipeline.data.predictions import read_coverage
from pipeline.evaluation.metrics import pck_table, score_files
from pipeline.matching.match import match_store, match_to_file
from pipeline.data.spair import load_split

PAIR = "000002-demo_00000-demo_00001:star"
IMAGE = "JPEGImages/star/demo_00001.jpg"
# As conftest's demo_stores builds vae-sd3, so that a run here can be compared with that store.
VAE_SD3 = BackboneParams(kind="vae-sd3", model="", latents="tiny-sd3", layers=["latent"], timesteps=[261], ensemble=1,
                         noise=False)


@pytest.fixture
def root(demo_root, tmp_path):
    """A private copy of the demo dataset to damage."""
    return shutil.copytree(demo_root, tmp_path / "demo")


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def edit_pair(root, **fields):
    path = root / "PairAnnotation" / "test" / f"{PAIR}.json"
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))
    return path


def test_skip_lists_what_it_left_out(root):
    fine = load_split(root, "test")
    (root / IMAGE).unlink()
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed) == f"{root / IMAGE}: image is missing"
    split = load_split(root, "test", on_error="skip")
    using = fine.pairs[(fine.pairs["src_image"] == "star/demo_00001") | (fine.pairs["trg_image"] == "star/demo_00001")]
    assert sorted(split.skipped["pair"]) == sorted(using["filename"])
    assert split.skipped["reason"].str.endswith("image is missing").all()
    assert len(split.pairs) == len(fine.pairs) - len(using)
    assert "star/demo_00001" not in set(split.images["image"])


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable image (image file is truncated"),
    (lambda p: p.write_bytes(b"not an image at all " * 20), "unreadable image (cannot identify image file"),
    (lambda p: p.unlink(), "image is missing"),
])
def test_broken_images(root, damage, reason):
    damage(root / IMAGE)
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed).startswith(f"{root / IMAGE}: {reason}")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA"])
def test_grayscale_cmyk_and_rgba_images_are_read_as_rgb(root, mode):
    path = root / IMAGE
    original = Image.open(path).convert("RGB")
    # JPEG has no alpha channel: an RGBA file in the wild is a PNG under a .jpg name.
    original.convert(mode).save(path, format="PNG" if mode == "RGBA" else "JPEG", quality=95)
    split = load_split(root, "test")  # accepted
    assert "star/demo_00001" in set(split.images["image"])
    canvas = load_canvas(path, 64, "squash")
    expected = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), np.float32)
    np.testing.assert_allclose(canvas.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("write, field, reason", [
    (lambda p: p.write_text('{"pair_id": 2, "filename": '), None, "unreadable JSON"),  # truncated
    (lambda p: p.write_text("not json at all"), None, "unreadable JSON"),
    (lambda p: p.write_text("[1, 2]"), None, "expected a JSON object"),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "trg_kps"})),
     "trg_kps", "missing"),  # partial
])
def test_malformed_pair_files(root, write, field, reason):
    path = root / "PairAnnotation" / "test" / f"{PAIR}.json"
    write(path)
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed).startswith(": ".join(p for p in (str(path), field, reason) if p))
    skipped = load_split(root, "test", on_error="skip").skipped
    assert skipped["pair"].tolist() == [PAIR]


def test_keypoint_outside_the_image(root):
    path = edit_pair(root, src_kps=[[500, 10]] + json.loads((root / "PairAnnotation" / "test" / f"{PAIR}.json")
                                                            .read_text())["src_kps"][1:])
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed).startswith(f"{path}: src_kps[0]: keypoint [500, 10] outside the")


def test_empty_keypoint_list(root):
    path = edit_pair(root, src_kps=[], trg_kps=[], kps_ids=[])
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed) == f"{path}: kps_ids: no keypoints"


def test_zero_area_bbox(root):
    path = edit_pair(root, trg_bndbox=[10, 10, 10, 50])
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed) == f"{path}: trg_bndbox: zero-area box [10, 10, 10, 50]"


def test_inverted_bbox(root):
    path = edit_pair(root, src_bndbox=[90, 10, 40, 50])
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    assert one_line(failed) == f"{path}: src_bndbox: inverted box [90, 10, 40, 50] (x2 < x1)"


def test_an_image_resized_to_half_fails_naming_it_both_sizes_and_its_pairs(root):
    from PIL import Image

    fine = load_split(root, "test")
    with Image.open(root / IMAGE) as image:
        width, height = image.size
        image.resize((width // 2, height // 2)).save(root / IMAGE)
    using = sorted(fine.pairs.loc[(fine.pairs["src_image"] == "star/demo_00001") | (fine.pairs["trg_image"] == "star/demo_00001"),
                                  "filename"])
    first = fine.pairs[fine.pairs["filename"].isin(using)].iloc[0]
    side = "src" if first["src_image"] == "star/demo_00001" else "trg"
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test")
    named = ", ".join(using[:3]) + (f" and {len(using) - 3} more" if len(using) > 3 else "")
    assert one_line(failed) == (f"{root / IMAGE}: size: image is {width // 2} x {height // 2} (W x H) but annotated {width} x {height} (W x H) "
                                f"({first['filename']}.json {side}_imsize); used by {len(using)} pair(s): {named}")
    split = load_split(root, "test", on_error="skip")
    assert sorted(split.skipped["pair"]) == using and len(split.pairs) == len(fine.pairs) - len(using)


# Malformed parameter files, each with the one-line errors it must give (all of them, before any work).
BAD_PARAMS = [
    ("backbones.sd2.layers", "up_blocks.1",
     ["backbones.sd2.layers: expected a non-empty list of strings, got 'up_blocks.1'"]),
    ("backbones.sd2.ensemble", "two", ["backbones.sd2.ensemble: expected an integer >= 1, got 'two'"]),
    ("backbones.sd3.timesteps", [101, 1200], ["backbones.sd3.timesteps[1]: expected an integer in 0..1000, got 1200"]),
    ("backbones.sd2.kind", "sd4",
     ["backbones.sd2.kind: expected one of 'sd2', 'sd3', 'flux', 'vae-sd2', 'vae-sd3', 'dinov2', 'clip', got 'sd4'"]),
    ("encoders.tiny-sd2.canvas_mode", "crop", ["encoders.tiny-sd2.canvas_mode: expected one of 'squash', 'pad', 'center', got 'crop'"]),
    ("match.protocols", ["dift", "geoware"], ["match.protocols[1]: expected one of 'dift', 'geoaware', 'sd-dino', got 'geoware'"]),
    ("backbones.sd2.dtype", "fp16", ["backbones.sd2.dtype: expected one of 'float32', 'float16', 'bfloat16', got 'fp16'"]),
    ("backbones.sd2.layer", ["up_blocks.1"], ["backbones.sd2.layers: missing: a non-empty list of strings is required",
                                              "backbones.sd2.layer: unknown parameter; did you mean 'layers'?"]),
    ("matchh", {}, ["matchh: unknown parameter; did you mean 'match'?"]),
    ("canvases.pixels.canvas", 225, [
        "canvases.pixels.canvas: 225 px is not a multiple of 14 px, which clip needs (its patch; backbones.clip)",
        "canvases.pixels.canvas: 225 px is not a multiple of 14 px, which dinov2 needs (its patch; backbones.dinov2)"]),
    ("backbones.sd3.storage", "int4", ["backbones.sd3.storage: expected float16, float16-shuffle or pca:<K>, got 'int4'"]),
    ("backbones.sd2.latents", "tiny-sd9",
     ["backbones.sd2.latents: no encoder or canvas named 'tiny-sd9'; encoders has ['tiny-flux', 'tiny-sd2', 'tiny-sd3'], "
      "canvases ['pixels']"]),
    ("encoders.tiny-sd2.kind", "pixels", ["encoders.tiny-sd2.kind: a store of the canvas itself is a `canvases` entry "
                                          "({canvas: ..., canvas_mode: ...})"]),
]


@pytest.mark.parametrize("key, value, errors", BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_malformed_params_are_refused_before_any_work(key, value, errors, tmp_path, monkeypatch):
    """Through the command line, as a user meets them: exit 2, the documented lines, nothing written."""
    import yaml
    from click.testing import CliRunner

    from cli import cli
    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in params["backbones"].values():  # models/ of a fresh clone: the ViT patch from the default
        name["model"] = name["model"].replace("models/", "absent/")
    datasets = params["datasets"]
    for section in (params["encoders"], datasets["hpatches"]["backbones"], datasets["davis"]["backbones"]):  # the same models
        for name in section.values():
            name["model"] = name["model"].replace("models/", "absent/")
    node, *path = params, *key.split(".")
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    if path[-1] == "layer":
        del node["layers"]
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(cli, ["plan", "--images", "10"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: params.yaml: {line}" for line in errors]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_every_problem_at_once(tmp_path):
    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["backbones"]["sd2"]["ensemble"] = 0
    params["match"]["statistics"] = "most"
    params["dask"]["workerz"] = 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as failed:
        load_params(path)
    assert str(failed.value).splitlines() == [
        f"{path}: backbones.sd2.ensemble: expected an integer >= 1, got 0",
        f"{path}: match.statistics: expected one of 'none', 'basic', 'all', got 'most'",
        f"{path}: dask.workerz: unknown parameter; did you mean 'workers'?",
    ]


def test_unknown_category_layer_and_backbone(root, demo_stores):
    with pytest.raises(PipelineError) as failed:
        load_split(root, "test", categories=["dragon"])
    assert one_line(failed) == f"{root}: categories: unknown category ['dragon']; split 'test' has ['blob', 'star', 'tile']"
    path = demo_stores["stores"]["tiny-sd3"]
    with pytest.raises(PipelineError) as failed:
        match_store(path, demo_stores["pairs"], layers=["transformer_blocks.9"])
    assert one_line(failed).startswith(f"{path}: layer: unknown layer 'transformer_blocks.9'; the store has")
    with pytest.raises(PipelineError) as failed:
        load_params().backbone("sd9")
    assert one_line(failed).startswith("params.yaml: backbones: unknown name 'sd9'")
    params = replace(VAE_SD3, kind="sd9", model=demo_stores["models"]["tiny-sd3"])
    with pytest.raises(PipelineError) as failed:
        extract(params, "x", demo_stores["latents"]["tiny-sd3"], root / "x.zarr")
    assert one_line(failed).startswith("params.yaml: kind: unknown backbone kind 'sd9'")


def _vae_sd3(demo_stores, out, on_error="fail", **changes):
    params = replace(VAE_SD3, model=demo_stores["models"]["tiny-sd3"], **changes)
    return extract(params, "vae-sd3", demo_stores["latents"]["tiny-sd3"], out, on_error=on_error)


def test_store_with_another_fingerprint_is_refused_and_kept(demo_stores, tmp_path):
    path = shutil.copytree(demo_stores["stores"]["vae-sd3"], tmp_path / "vae-sd3.zarr")
    before = store_files(path)
    with pytest.raises(PipelineError) as failed:
        _vae_sd3(demo_stores, path, seed=3)
    assert one_line(failed) == (f"{path}: fingerprint: store was built with other parameters, model or code (seed: 0 -> 3); "
                                "pass --overwrite to rebuild it or choose another --store")
    assert store_files(path) == before


def test_full_disk_fails_in_one_line_keeps_finished_images_and_resumes(demo_stores, tmp_path, monkeypatch):
    import zarr.storage._local as local

    reference = demo_stores["stores"]["vae-sd3"]
    real_put = local._put

    def put(path, value, exclusive=False):
        if "latent/features/c/10/" in path.as_posix():  # the disk fills up at the 11th image
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    out = tmp_path / "vae-sd3.zarr"
    with pytest.raises(PipelineError) as failed:
        _vae_sd3(demo_stores, out)
    assert one_line(failed) == (f"{out}: disk: no space left on device; free space and re-run to resume "
                                "(finished work is kept)")
    monkeypatch.setattr(local, "_put", real_put)
    partial = FeatureStore.as_written(out)
    done = partial.done_mask()
    assert done.tolist() == [True] * 10 + [False] * (len(done) - 10)
    kept = {i: partial["latent/features"][i] for i in np.flatnonzero(done)}
    _vae_sd3(demo_stores, out)  # space freed: resumes
    for i, values in kept.items():
        np.testing.assert_array_equal(zarr.open_group(out, mode="r")["latent/features"][i], values)
    assert store_files(out) == store_files(reference)


def test_an_images_other_writes_end_before_its_failed_write_is_raised(tmp_path):
    """FeatureStore.write_image writes an image's arrays concurrently: when one fails (a full disk), the error
    comes only once the others have ended, so that none is still writing when the run gives up its lock."""

    class FailingArray:  # fails at once, while the large write below is still encoding
        class async_array:
            @staticmethod
            async def setitem(index, values):
                raise OSError(errno.ENOSPC, "No space left on device")

    root = zarr.open_group(tmp_path / "writes.zarr", mode="w")
    large = root.create_array("large", shape=(2, 1024, 1024), dtype="float32", chunks=(1, 256, 1024))
    values = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    with pytest.raises(OSError):
        FeatureStore.write_image(1, [(FailingArray, np.zeros(1)), (large, values)])
    np.testing.assert_array_equal(large[1], values)


@pytest.fixture
def poisoned(monkeypatch):
    """The VAE-latent backbone gives +inf features for every 'blob' image (as a float16 overflow would)."""
    from pipeline.models.backbones.vae import VAELatent

    real_run = VAELatent.run

    def run(self, x, t, category):
        outputs = real_run(self, x, t, category)
        if category == "blob":
            outputs["latent"]["features"] = outputs["latent"]["features"] * np.inf
        return outputs

    monkeypatch.setattr(VAELatent, "run", run)


def test_non_finite_features_fail_or_skip(demo_stores, tmp_path, poisoned, capsys):
    out = tmp_path / "vae-sd3.zarr"
    with pytest.raises(PipelineError) as failed:
        _vae_sd3(demo_stores, out)
    assert one_line(failed).startswith(f"{out}: latent/features: non-finite values for image 'blob/")
    done_before = FeatureStore.as_written(out).done_mask()

    _vae_sd3(demo_stores, out, on_error="skip")
    table = FeatureStore.as_written(out).images()
    blobs = table["category"] == "blob"
    assert not table.loc[blobs, "done"].any() and table.loc[~blobs, "done"].all()
    assert table.loc[blobs, "error"].str.contains("non-finite values").all()
    assert table.loc[done_before, "done"].all()  # what was cached before is kept
    assert f"skipped {int(blobs.sum())} item(s)" in capsys.readouterr().err

    pairs = demo_stores["pairs"]
    with pytest.raises(PipelineError) as failed:
        match_store(out, pairs)
    assert one_line(failed).startswith(f"{out}: images/error: image 'blob/")
    predictions = match_store(out, pairs, on_error="skip")
    assert set(predictions["category"]) == {"star", "tile"}
    assert set(predictions["pair"]) == set(pairs.loc[pairs["category"] != "blob", "filename"])
    assert f"skipped {int((pairs['category'] == 'blob').sum())} item(s)" in capsys.readouterr().err
    # The skipped pairs travel with the predictions, with their reason, and every PCK table counts them.
    written = match_to_file(out, pairs, tmp_path / "p.parquet", on_error="skip")
    coverage = read_coverage(written)
    blob_pairs = sorted(pairs.loc[pairs["category"] == "blob", "filename"])
    assert sorted(pair for pair, _, _ in coverage["skipped"]) == blob_pairs
    assert all(category == "blob" and "images/error: image 'blob/" in reason for _, category, reason in coverage["skipped"])
    table = score_files([written])
    pooled = table[(table["category"] == "all") & (table["kind"] == "per_image")]
    assert (pooled["pairs"] == len(pairs) - len(blob_pairs)).all() and (pooled["split_pairs"] == len(pairs)).all()
    assert (table.loc[table["category"] == "blob", "pairs"].empty)
    assert (pck_table(predictions)["split_pairs"].max()) == len(pairs)


def test_non_finite_values_in_a_cached_store_are_reported(demo_stores, tmp_path):
    path = shutil.copytree(demo_stores["stores"]["vae-sd3"], tmp_path / "vae-sd3.zarr")
    node = zarr.open_group(path, mode="r+")["latent/features"]
    values = node[3]
    values[0, 0, 0, 0] = np.nan
    node[3] = values
    image = FeatureStore.open(path).images()["image"][3]
    pairs = demo_stores["pairs"]
    using = pairs[(pairs["src_image"] == image) | (pairs["trg_image"] == image)]
    with pytest.raises(PipelineError) as failed:
        match_store(path, using)
    assert one_line(failed).startswith(f"{path}: latent/features: non-finite values for image {image!r}; ")


def test_corrupt_image_skipped_at_encode_is_skipped_downstream(demo_stores, tmp_path, root, capsys):
    (root / IMAGE).write_bytes(b"garbage")
    images = load_split(demo_stores["root"], "test").images  # prepared before the image broke
    params = EncoderParams(model=demo_stores["models"]["tiny-sd3"], canvas=128)
    with pytest.raises(PipelineError) as failed:
        encode(params, images, root, tmp_path / "latents.zarr")
    assert one_line(failed).startswith(f"{root / IMAGE}: unreadable image")
    latents = encode(params, images, root, tmp_path / "latents.zarr", on_error="skip")
    table = FeatureStore.open(latents).images()
    assert table.loc[~table["done"], "image"].tolist() == ["star/demo_00001"]
    params = replace(VAE_SD3, model=demo_stores["models"]["tiny-sd3"])
    features = extract(params, "vae-sd3", latents, tmp_path / "f.zarr", on_error="skip")
    table = FeatureStore.open(features).images()
    assert table.loc[~table["done"], "image"].tolist() == ["star/demo_00001"]
    assert "not encoded" in table.loc[~table["done"], "error"].item()
    assert "star/demo_00001" in capsys.readouterr().err
    assert table["image"].tolist() == images["image"].tolist()


def test_a_stage_refuses_malformed_params_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["split"] = "testing"
    params["on_error"] = "ignore"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: params.yaml: data.split: expected one of 'trn', 'val', 'test', got 'testing'",
        "error: params.yaml: on_error: expected one of 'fail', 'skip', got 'ignore'",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
