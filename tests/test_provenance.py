"""A store is reused only when the same parameters, model and code built it, and never deleted except on
purpose (pipeline/cache/provenance.py, store.open_store)."""

from __future__ import annotations

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
from pipeline.cache.encode import encode
from pipeline.cache.extract import feature_modules
from pipeline.config import EncoderParams
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny
from pipeline.models.backbones import sd2
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
    first = provenance.code_identity(loaded)
    module.write_text('# a comment\ndef f(x):\n    """Another doc."""\n\n    return x + 1  # same code\n')
    assert provenance.code_identity(importlib.reload(loaded)) == first
    module.write_text('def f(x):\n    return x + 2\n')
    assert provenance.code_identity(importlib.reload(loaded)) != first
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
    assert sd2 in {m for m in feature_modules("sd2")}

    original_run = sd2.SD2.run

    def run_scaled(self, x, t, category):  # a "fix" to the feature code: the maps come out doubled
        return {layer: {"features": arrays["features"] * 2} for layer, arrays in original_run(self, x, t, category).items()}

    monkeypatch.setattr(sd2.SD2, "run", run_scaled)
    refused = CliRunner().invoke(cli, ["extract", "--backbone", "b"])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: store/b.zarr: fingerprint: store was built with other parameters, "
                                     "model or code (code:pipeline.models.backbones.sd2: ")
    assert np.array_equal(zarr.open_group(path, mode="r")["up_blocks.1/features"][:], old)  # refused, untouched

    status, err = _stage(capsys)
    assert status == 0
    assert "store/b.zarr: replacing the store there (built with other parameters, model or code " \
           "(code:pipeline.models.backbones.sd2: " in err
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
    assert store.done_mask(zarr.open_group(path, mode="r")).all()


def test_a_zarr_group_that_is_not_a_store_is_never_replaced_by_the_stage(project, tmp_path, monkeypatch, capsys):
    _fresh(project, tmp_path, monkeypatch)
    path = Path("store/b.zarr")
    zarr.open_group(path, mode="w").create_array("someone_elses", shape=(3,), dtype="int8")[:] = 1
    before = store_files(path)
    status, err = _stage(capsys)
    assert status == 2 and err.strip() == ("error: store/b.zarr: fingerprint: not a dift-cache store; it was left "
                                           "as it is (--overwrite replaces it)")
    assert store_files(path) == before
