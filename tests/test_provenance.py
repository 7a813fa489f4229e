"""A store is reused only when the same parameters, model and code built it, and never deleted except on
purpose (pipeline/cache/provenance.py, FeatureStore.create)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from cli import cli
from conftest import store_files
from pipeline.cache import provenance, store
from pipeline.cache.store import FeatureStore
from pipeline.cache.encode import encode
from pipeline.cache import extract
from pipeline.config import BackboneParams, EncoderParams
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny
from pipeline.models.backbones import sd2
from pipeline.models.kinds import KINDS
from stages import extract as extract_stage
from stages import run

CANVAS = 64


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_root):
    """A project folder: params.yaml with one SD2 backbone, its latents encoded."""
    base = tmp_path_factory.mktemp("provenance")
    images = load_split(demo_root, "test").images.iloc[:3].reset_index(drop=True)
    images.to_parquet(base / "images.parquet")
    model = str(make_tiny("tiny-sd2", base / "tiny-sd2"))
    encode(EncoderParams(model=model, canvas=CANVAS), images, demo_root, base / "store/latents/e.zarr")
    params = {
        "data": {"root": str(demo_root), "images": "images.parquet"},
        "encoders": {"e": {"model": model, "canvas": CANVAS}},
        "backbones": {"b": {"kind": "sd2", "model": model, "latents": "e", "layers": ["up_blocks.1"],
                            "timesteps": [261], "ensemble": 1}},
    }
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    return base


def _stage(capsys) -> tuple[int, str]:
    """Run the DVC stage `extract@b` as DVC would: its exit status and what it printed to stderr."""
    try:
        run(extract_stage.main, "b")
        status = 0
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def _fresh(project, tmp_path, monkeypatch) -> Path:
    import shutil

    work = tmp_path / "project"
    shutil.copytree(project, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def test_code_identity_ignores_comments_and_docstrings_but_not_code(tmp_path, monkeypatch):
    module = tmp_path / "feature_code.py"
    module.write_text('def f(x):\n    """Doc."""\n    return x + 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    loaded = importlib.import_module("feature_code")
    first = provenance.code_closure([loaded.f])
    assert list(first) == ["feature_code.f"]
    module.write_text('# a comment\ndef f(x):\n    """Another doc."""\n\n    return x + 1  # same code\n')
    assert provenance.code_closure([importlib.reload(loaded).f]) == first
    module.write_text('def f(x):\n    return x + 2\n')
    assert provenance.code_closure([importlib.reload(loaded).f]) != first
    sys.modules.pop("feature_code")


def test_model_identity_is_weights_and_configs_only(tmp_path):
    model = make_tiny("tiny-sd2", tmp_path / "m")
    before = provenance.model_identity(str(model))
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache/huggingface/unet.metadata").write_text("1700000000.123")  # rewritten on every download
    (model / "README.md").write_text("a model card edit")
    assert provenance.model_identity(str(model)) == before
    config = model / "unet" / "config.json"
    config.write_text(config.read_text().replace("\"sample_size\"", "\"sample_size\" ", 1))
    assert provenance.model_identity(str(model)) != before


def test_no_model_is_not_the_working_directory(tmp_path, monkeypatch):
    """The pixels encoder has no model (""): adding a JSON file to the project must not rebuild its store."""
    monkeypatch.chdir(tmp_path)
    before = provenance.model_identity("")
    (tmp_path / "results.json").write_text("{}")
    assert provenance.model_identity("") == before == ""


def test_a_change_to_a_backbones_feature_code_rebuilds_under_dvc_and_is_refused_by_the_cli(
        project, tmp_path, monkeypatch, capsys):
    _fresh(project, tmp_path, monkeypatch)
    assert _stage(capsys)[0] == 0
    path = Path("store/b.zarr")
    old = zarr.open_group(path, mode="r")["up_blocks.1/features"][:]

    original_run = sd2.SD2.run

    def run_scaled(self, x, t, category):  # a "fix" to the feature code: the maps come out doubled
        return {layer: {"features": arrays["features"] * 2} for layer, arrays in original_run(self, x, t, category).items()}

    monkeypatch.setattr(sd2.SD2, "run", run_scaled)
    refused = CliRunner().invoke(cli, ["extract", "--backbone", "b"])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: store/b.zarr: fingerprint: store was built with other parameters, "
                                     "model or code (")
    assert "pipeline.models.backbones.sd2.SD2.run" in refused.output
    assert np.array_equal(zarr.open_group(path, mode="r")["up_blocks.1/features"][:], old)  # refused, untouched

    status, err = _stage(capsys)
    assert status == 0
    assert "store/b.zarr: replacing the store there (built with other parameters, model or code (" in err
    assert "pipeline.models.backbones.sd2.SD2.run" in err
    new = zarr.open_group(path, mode="r")["up_blocks.1/features"][:]
    np.testing.assert_allclose(new.astype(np.float32), 2 * old.astype(np.float32), rtol=2e-3, atol=1e-3)


def test_an_unreadable_store_is_left_as_it_is_by_the_stage_and_replaced_by_the_cli_on_request(
        project, tmp_path, monkeypatch, capsys):
    _fresh(project, tmp_path, monkeypatch)
    assert _stage(capsys)[0] == 0
    path = Path("store/b.zarr")
    (path / "zarr.json").write_text("{ not json")  # root metadata corrupted (or a newer format, or an NFS hiccup)
    before = store_files(path)
    status, err = _stage(capsys)
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: store/b.zarr: cannot read this store (")
    assert err.rstrip().endswith("it was left as it is: fix access to it, or replace it with --overwrite")
    assert store_files(path) == before  # every chunk file still there, unchanged

    refused = CliRunner().invoke(cli, ["extract", "--backbone", "b"])
    assert refused.exit_code == 2 and store_files(path) == before
    replaced = CliRunner().invoke(cli, ["extract", "--backbone", "b", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "store/b.zarr: replacing the store there (unreadable (" in replaced.output
    assert FeatureStore.open(path).done_mask().all()


def test_a_zarr_group_that_is_not_a_store_is_never_replaced_by_the_stage(project, tmp_path, monkeypatch, capsys):
    _fresh(project, tmp_path, monkeypatch)
    path = Path("store/b.zarr")
    zarr.open_group(path, mode="w").create_array("someone_elses", shape=(3,), dtype="int8")[:] = 1
    before = store_files(path)
    status, err = _stage(capsys)
    assert status == 2 and err.strip() == ("error: store/b.zarr: fingerprint: not a dift-cache store; it was left "
                                           "as it is (--overwrite replaces it)")
    assert store_files(path) == before


# A complete fingerprint (issue 26, point 2): the code the extraction reaches, the libraries' versions, the
# model's full contents.


LATENTS = "store/latents/e.zarr"


def _params(project, **changes) -> BackboneParams:
    model = yaml.safe_load((project / "params.yaml").read_text())["encoders"]["e"]["model"]
    return BackboneParams(**{"kind": "sd2", "model": model, "latents": "e", "layers": ["up_blocks.1"],
                             "timesteps": [261], "ensemble": 1, **changes})


def _determinants(project, **changes) -> dict:
    return extract._determinants(_params(project, **changes), FeatureStore.open_latents(project / LATENTS).attrs)


def test_a_change_to_the_extraction_loops_code_changes_the_fingerprint_and_is_named(project, monkeypatch):
    """`_Images.maps` lives in pipeline/cache/extract.py, whose other functions (progress, locking, sharding)
    do not count: the fingerprint follows what the extraction calls, not a list of modules."""
    import torch

    from pipeline.cache.features import image_maps
    from pipeline.errors import PipelineError

    before = _determinants(project)
    expected = extract.expected_fingerprint(_params(project), project / LATENTS)
    assert expected == store.fingerprint(before)

    def maps_half_std(self, index):  # every value changes: the posterior's std is halved
        source = self.sources[index]
        image, category = self.images["image"].iloc[source], self.images["category"].iloc[source]
        if not self.images["done"].iloc[source]:
            raise PipelineError(self.latents_path, image, "not encoded")
        mean = torch.from_numpy(self.mean[source]).permute(2, 0, 1)
        std = torch.from_numpy(self.std[source]).permute(2, 0, 1) * 0.5
        return image_maps(self.params, self.backbone, image, category, mean, std, self.out)

    monkeypatch.setattr(extract._Images, "maps", maps_half_std)
    after = _determinants(project)
    assert extract.expected_fingerprint(_params(project), project / LATENTS) != expected
    assert provenance.differences(before, after) == ["code pipeline.cache.extract._Images.maps changed"]


def test_a_library_version_is_part_of_the_fingerprint(project, monkeypatch):
    import importlib.metadata

    before = _determinants(project)
    assert set(before["versions"]) >= {"torch", "diffusers", "transformers", "zarr"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "torch" else real(name))
    after = _determinants(project)
    assert store.fingerprint(after) != store.fingerprint(before)
    assert provenance.differences(before, after) == [f"versions.torch: {before['versions']['torch']!r} -> '9.9.9'"]
    # Another Python parses the code otherwise (ast.dump): a store read under it is stale, and says why.
    version = type("version_info", (), {"major": 3, "minor": 99})
    monkeypatch.setattr(provenance, "sys", type("sys", (), {"version_info": version, "modules": sys.modules}))
    other = _determinants(project)
    assert f"versions.python: '{sys.version_info.major}.{sys.version_info.minor}' -> '3.99'" in \
        provenance.differences(after, other)


def test_code_the_extraction_does_not_reach_leaves_the_fingerprint_as_it_is(project, monkeypatch):
    from pipeline.models import realsize
    from pipeline.models.backbones import flux
    from pipeline.workflows import plan

    before = _determinants(project)
    monkeypatch.setattr(realsize.ConfigParts, "load", lambda self, cls, subfolder=None, denoiser=False: None)
    monkeypatch.setattr(plan, "make_plan", lambda params, images=None, results=None: {})
    monkeypatch.setattr(flux.Flux, "run", lambda self, x, t, category: {})  # another backbone's code
    monkeypatch.setattr(extract, "extract", lambda *args, **kwargs: None)  # orchestration: what the workers run counts
    # A kind's declarations check a run and shape no value: another kind added, or this one's edited, counts nothing.
    monkeypatch.setitem(KINDS, "sdxl", dataclasses.replace(KINDS["sd2"], name="sdxl"))
    monkeypatch.setitem(KINDS, "sd2", dataclasses.replace(KINDS["sd2"], offload=("none",)))
    assert _determinants(project) == before


def test_a_change_to_the_capture_changes_the_fingerprint_and_is_named(project, monkeypatch):
    """The forward-hook capture every backbone shares (pipeline/models/backbones/base.py) shapes stored values:
    replacing it changes the fingerprint, and the change names it."""
    import contextlib

    from pipeline.models.backbones import base

    before = _determinants(project)
    original = base.capture

    @contextlib.contextmanager
    def capture_inputs(model, names, pick, inputs=False):  # captures what each block reads, not what it returns
        with original(model, names, pick, inputs=True) as captured:
            yield captured

    for module in (base, sd2):  # an edit of base.py: every family that imported it sees the new function
        monkeypatch.setattr(module, "capture", capture_inputs)
    after = _determinants(project)
    assert store.fingerprint(after) != store.fingerprint(before)
    assert "code pipeline.models.backbones.base.capture removed" in provenance.differences(before, after)
    assert "code pipeline.models.backbones.sd2.capture added" in provenance.differences(before, after)  # the new one


def test_the_closure_holds_what_an_sd3_extraction_runs():
    params = BackboneParams(kind="sd3", model="", latents="l", layers=["transformer_blocks.1"])
    code = extract.feature_code(params)
    assert {"pipeline.cache.features.image_maps", "pipeline.cache.features.layer_tensors",
            "pipeline.cache.features.as_float16", "pipeline.cache.features.FLOAT16_MAX",
            "pipeline.cache.extract._extract_images", "pipeline.cache.extract._Images.maps",
            "pipeline.cache.extract._Images.lay_out", "pipeline.cache.store.FeatureStore.write_image",
            "pipeline.cache.codecs.OneBlasThread.__enter__",  # `codecs.one_blas_thread`: an instance, its class
            "pipeline.models.backbones.sd3.SD3.run", "pipeline.models.backbones.sd3.SD3.modulation",
            "pipeline.models.backbones.sd3.SD3.noised", "pipeline.models.backbones.base.Backbone.__init__",
            "pipeline.models.backbones.base.Backbone.model_latent", "pipeline.models.backbones.base.capture",
            "pipeline.models.backbones.base.flow_noised", "pipeline.models.backbones.base.adaln_modulation",
            "pipeline.models.backbones.parts.Parts.load", "pipeline.models.backbones.registry.backbone_class",
            "pipeline.models.backbones.registry.check_canvas"} <= set(code)
    assert all(len(digest) == 12 for digest in code.values()) and list(code) == sorted(code)
    assert not [name for name in code if "ConfigParts" in name or ".flux." in name or ".sd2." in name
                or name.startswith(("pipeline.workflows", "pipeline.cache.provenance", "pipeline.models.realsize",
                                    "pipeline.cache.sizes", "pipeline.models.kinds")) or name.endswith(".KINDS")]
    assert "pipeline.cache.extract.extract" not in code and "pipeline.cache.extract._backbones" not in code
    # The `pca:K` fit counts only for `pca:K`; a lossy storage brings the codecs' classes (Zarr's registry).
    assert "pipeline.cache.extract._fit_axes" not in code and "pipeline.cache.codecs.LayerMoments.fit" not in code
    pca = extract.feature_code(BackboneParams(kind="sd3", model="", latents="l", layers=["x"], storage="pca:8"))
    assert {"pipeline.cache.extract._fit_axes", "pipeline.cache.codecs.LayerMoments.fit"} <= set(pca)


def test_the_closure_is_live_and_follows_constants(monkeypatch):
    from pipeline.cache import features

    params = BackboneParams(kind="sd3", model="", latents="l", layers=["x"])
    before = extract.feature_code(params)
    monkeypatch.setattr(features, "FLOAT16_MAX", 1000.0)
    assert provenance.differences(before, extract.feature_code(params)) == ["pipeline.cache.features.FLOAT16_MAX changed"]
    monkeypatch.undo()
    monkeypatch.setitem(extract._backbones, "loaded", object())  # a module's cache is not code
    assert extract.feature_code(params) == before


def test_a_wrapper_counts_itself_when_the_project_wrote_it():
    import functools

    from pipeline.cache import features

    def doubled(function):
        @functools.wraps(function)
        def wrapper(values):
            stored, overflow = function(values)
            return stored * 2, overflow
        return wrapper

    code = provenance.code_closure([doubled(features.as_float16)])
    assert sorted(code) == ["pipeline.cache.features.FLOAT16_MAX", "pipeline.cache.features.as_float16",
                            "pipeline.cache.features.as_float16'"]  # the wrapper (named as what it wraps), then that
    assert len(set(code.values())) == 3
    from pipeline.models.backbones import base

    assert list(provenance.code_closure([base.capture])) == [  # contextlib's wrapper: the function it wraps
        "pipeline.models.backbones.base.StopForward", "pipeline.models.backbones.base.capture"]


def test_latents_stores_count_their_encoding_code():
    from pipeline.cache import encode as encoding

    code = encoding.latents_code()
    assert {"pipeline.cache.encode._encode_image", "pipeline.cache.encode.posterior", "pipeline.cache.encode.load_canvas",
            "pipeline.cache.encode.canvas_layout", "pipeline.cache.encode.images_on_canvas",
            "pipeline.models.hub.from_pretrained", "pipeline.data.images.open_rgb"} <= set(code)
    assert not [name for name in code if ".backbones." in name or "extract" in name]


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A model folder with a 3 MiB weight file, read a minute after it was written, its digests cached in
    tmp_path; and the list of files read to compute them."""
    import os
    import time

    monkeypatch.setenv("DIFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(provenance, "_known", {})
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (model / "unet" / "weights.safetensors").write_bytes(np.random.default_rng(0).bytes(3 << 20))
    for path in model.rglob("*"):  # so that an edit in the test gets another mtime, however coarse the clock
        os.utime(path, (time.time() - 60, time.time() - 60))
    monkeypatch.setattr(provenance, "_clock", lambda: time.time_ns() + 60 * 10**9)  # ctime: now
    reads = []
    real = provenance._sha256
    monkeypatch.setattr(provenance, "_sha256", lambda path: reads.append(Path(path).name) or real(path))
    return model, reads


def test_model_identity_sees_one_byte_changed_in_the_middle_of_a_large_file(weights):
    model, reads = weights
    before = provenance.model_identity(str(model))
    weights_file = model / "unet" / "weights.safetensors"
    with weights_file.open("r+b") as handle:
        handle.seek(3 << 19)  # 1.5 MiB: neither the first nor the last MiB
        original = handle.read(1)
        handle.seek(3 << 19)
        handle.write(bytes([original[0] ^ 1]))
    assert provenance.model_identity(str(model)) != before


def test_model_identity_reads_an_unchanged_file_once(weights, monkeypatch):
    import time

    model, reads = weights
    first = provenance.model_identity(str(model))
    assert sorted(reads) == ["model_index.json", "weights.safetensors"]
    assert provenance.model_identity(str(model)) == first and len(reads) == 2  # this process remembers
    monkeypatch.setattr(provenance, "_known", {})  # another process: the cache file remembers
    assert provenance.model_identity(str(model)) == first and len(reads) == 2
    cache = provenance.digest_cache_path()
    assert cache.parent.name == "cache" and not list(model.rglob("*digest*"))  # never inside the model folder
    monkeypatch.setattr(provenance, "_clock", time.time_ns)
    (model / "unet" / "config.json").write_text("{}")  # read just after it was written: every time until it settles
    second = provenance.model_identity(str(model))
    assert second != first and reads[2:] == ["config.json"]
    assert provenance.model_identity(str(model)) == second and reads[3:] == ["config.json"]


def test_a_damaged_or_unwritable_digest_cache_only_costs_a_read(weights, monkeypatch, tmp_path):
    model, reads = weights
    first = provenance.model_identity(str(model))
    cache = provenance.digest_cache_path()
    cache.write_text("{ not json")
    monkeypatch.setattr(provenance, "_known", {})
    assert provenance.model_identity(str(model)) == first and len(reads) == 4
    assert provenance.model_identity(str(model)) == first and len(reads) == 4  # rewritten whole
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DIFT_CACHE_DIR", str(blocked))  # its folder cannot be made
    monkeypatch.setattr(provenance, "_known", {})
    assert provenance.model_identity(str(model)) == first and len(reads) == 6


def test_differences_name_what_changed():
    old = {"ensemble": 8, "model_identity": "0123456789abcdef", "prompt": "a photo of a " + "very " * 20 + "{category}",
           "code": {"pipeline.a.f": "0123456789ab", "pipeline.a.g": "0123456789ab", "pipeline.a.C.run": "aaaaaaaaaaaa"},
           "versions": {"torch": "2.13.0", "zarr": "3.1.0"}}
    new = {"ensemble": 4, "model_identity": "fedcba9876543210", "prompt": "a photo of a {category}",
           "code": {"pipeline.a.f": "0123456789ab", "pipeline.a.h": "0123456789ab", "pipeline.a.C.run": "bbbbbbbbbbbb"},
           "versions": {"torch": "2.14.0", "zarr": "3.1.0"}, "only": ["x"]}
    assert provenance.differences(old, new, limit=10) == [
        "code pipeline.a.C.run changed", "code pipeline.a.g removed", "code pipeline.a.h added", "ensemble: 8 -> 4",
        "model_identity changed", "only: (none) -> ['x']",
        "prompt: 'a photo of a very very very very ver... -> 'a photo of a {category}'",
        "versions.torch: '2.13.0' -> '2.14.0'"]
    assert provenance.differences(old, new) == ["code pipeline.a.C.run changed", "code pipeline.a.g removed",
                                                 "code pipeline.a.h added", "ensemble: 8 -> 4", "and 4 more"]
    assert provenance.differences(old, old) == []
    flat = {"code:pipeline.cache.features": "0123456789abcdef"}  # a store fingerprinted before the closure
    assert provenance.differences(flat, {"code": new["code"]}) == ["code added", "code:pipeline.cache.features removed"]
