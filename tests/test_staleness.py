"""Readers check a store's fingerprint against what params.yaml and the code would build now
(pipeline/cache/current.py): a stale store is refused in one line naming what differs, `--allow-stale`
reads it and says so, a store params.yaml has no backbone for is read as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from pipeline.cache import current
from pipeline.cache.encode import encode
from pipeline.cache.extract import extract
from pipeline.config import EncoderParams, load_params
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny
from pipeline.errors import PipelineError
from pipeline.models.backbones import sd2

CANVAS = 64
LAYER = "up_blocks.1"
STORE = "store/b.zarr"


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_root) -> Path:
    """A project folder: params.yaml with one tiny SD2 backbone `b`, three pairs of the demo split over three
    images, their latents and b's store, extracted with those params."""
    base = tmp_path_factory.mktemp("staleness")
    split = load_split(demo_root, "test")
    pairs = split.pairs.iloc[:3].reset_index(drop=True)
    keys = set(pairs["src_image"]) | set(pairs["trg_image"])
    images = split.images[split.images["image"].isin(keys)].reset_index(drop=True)
    pairs.to_parquet(base / "pairs.parquet")
    images.to_parquet(base / "images.parquet")
    model = str(make_tiny("tiny-sd2", base / "tiny-sd2"))
    encode(EncoderParams(model=model, canvas=CANVAS), images, demo_root, base / "store/latents/e.zarr")
    params = {
        "data": {"root": str(demo_root), "pairs": "pairs.parquet", "images": "images.parquet"},
        "encoders": {"e": {"model": model, "canvas": CANVAS}},
        "backbones": {"b": {"kind": "sd2", "model": model, "latents": "e", "layers": [LAYER],
                            "timesteps": [261], "ensemble": 1}},
        "match": {"protocols": ["dift"], "statistics": "none"},
    }
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    extract(load_params(base / "params.yaml").backbone("b"), "b", base / "store/latents/e.zarr", base / STORE)
    return base


@pytest.fixture
def inside(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def edited_backbone(monkeypatch):
    """A behavioural edit of the sd2 backbone: the maps come out doubled (the fingerprint's code identity
    is computed from the live functions' source)."""
    original_run = sd2.SD2.run

    def run_scaled(self, x, t, category):
        return {layer: {"features": arrays["features"] * 2} for layer, arrays in original_run(self, x, t, category).items()}

    monkeypatch.setattr(sd2.SD2, "run", run_scaled)


def _params_with(project: Path, folder: Path, change) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    path = folder / "changed.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _match(out: Path, *extra: str):
    return CliRunner().invoke(cli, ["match", "--store", STORE, "--out", str(out), *extra])


def _warnings(result) -> list[str]:
    """The warning lines on stderr (among progress bars)."""
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_an_unchanged_project_is_current_and_matched_without_a_warning(inside, tmp_path):
    assert current.staleness(STORE, load_params()) is None
    result = _match(tmp_path / "p.parquet")
    assert result.exit_code == 0, result.output
    assert _warnings(result) == [] and "stale:" not in result.output
    assert len(pd.read_parquet(tmp_path / "p.parquet"))


def test_match_refuses_a_store_built_by_other_backbone_code_and_reads_it_with_allow_stale(
        inside, tmp_path, edited_backbone):
    out = tmp_path / "p.parquet"
    line = _one_error_line(_match(out))
    assert line.startswith(f"error: {STORE}: fingerprint: stale: built with other parameters, model or code than "
                           "params.yaml and the code give now (code pipeline.models.backbones.sd2.SD2.run")
    assert line.endswith("; rebuild it (`dvc repro --force --single-item extract@b`, or `cli.py extract --backbone b "
                         "--overwrite`) or read it anyway with --allow-stale")
    assert not out.exists() and not out.with_name(f"{out.name}.parts").exists()

    allowed = _match(out, "--allow-stale")
    assert allowed.exit_code == 0, allowed.output
    assert len(pd.read_parquet(out))
    warning = _warnings(allowed)
    assert len(warning) == 1 and warning[0].startswith(f"warning: {STORE}: stale: built with other parameters, "
                                                       "model or code than params.yaml and the code give now (code "
                                                       "pipeline.models.backbones.sd2.SD2.run")
    assert warning[0].endswith("; read anyway (--allow-stale)")
    assert "predictions -> " in allowed.stdout


def test_search_and_inspect_refuse_a_stale_store_too(inside, edited_backbone):
    search = ["search", "--store", STORE, "--layer", LAYER, "--image", "star/demo_00000", "--point", "20,20", "--top", "3"]
    inspect = ["inspect", "--store", STORE, "--layer", LAYER]
    for args in (search, inspect):
        line = _one_error_line(CliRunner().invoke(cli, args))
        assert line.startswith(f"error: {STORE}: fingerprint: stale: ") and "sd2.SD2.run" in line
        allowed = CliRunner().invoke(cli, [*args, "--allow-stale"])
        assert allowed.exit_code == 0, allowed.output
        assert allowed.stdout.strip() and len(_warnings(allowed)) == 1
        assert _warnings(allowed)[0].startswith(f"warning: {STORE}: stale: ")


def test_a_changed_parameter_is_named(inside, tmp_path):
    changed = _params_with(inside, tmp_path, lambda p: p["backbones"]["b"].update(ensemble=3))
    line = _one_error_line(_match(tmp_path / "p.parquet", "--params", str(changed)))
    assert f"than {changed} and the code give now (ensemble: 1 -> 3)" in line
    assert not (tmp_path / "p.parquet").exists()


def test_a_foreign_store_is_read_as_it_is(inside, tmp_path, edited_backbone):
    """params.yaml without a backbone of the store's name: nothing to compare with, even with the code edited."""
    foreign = _params_with(inside, tmp_path, lambda p: p.update(backbones={}))
    assert current.staleness(STORE, load_params(foreign)) is None
    result = _match(tmp_path / "p.parquet", "--params", str(foreign))
    assert result.exit_code == 0, result.output
    assert _warnings(result) == []


def test_without_its_latents_store_the_recorded_latents_fingerprint_is_taken(project, tmp_path, monkeypatch):
    """A store copied without its latents: what can be checked still is (an edit of the parameters)."""
    for name in ("params.yaml", "pairs.parquet", "images.parquet"):
        shutil.copy(project / name, tmp_path / name)
    shutil.copytree(project / STORE, tmp_path / STORE)
    monkeypatch.chdir(tmp_path)
    assert current.staleness(STORE, load_params()) is None
    changed = _params_with(tmp_path, tmp_path, lambda p: p["backbones"]["b"].update(seed=5))
    assert "(seed: 0 -> 5)" in current.staleness(STORE, load_params(changed), changed)


def test_the_explorer_and_the_match_stage_check_too(inside, edited_backbone, capsys):
    from pipeline.explorer.explorer import Explorer
    from stages import match as match_stage
    from stages import run

    params = load_params()
    pairs, images = pd.read_parquet("pairs.parquet"), pd.read_parquet("images.parquet")
    with pytest.raises(PipelineError, match="fingerprint: stale: .*sd2.SD2.run"):
        Explorer([STORE], pairs, images, params.data.root, params=params)
    explorer = Explorer([STORE], pairs, images, params.data.root, params=params, allow_stale=True)
    assert explorer.stale["b"].startswith(f"warning: {STORE}: stale: ")
    assert explorer.catalogue()["stores"][0]["stale"] == explorer.stale["b"]
    assert Explorer([STORE], pairs, images, params.data.root).stale == {}  # without params: as it is

    with pytest.raises(SystemExit) as exited:
        run(match_stage.main, "b")
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {STORE}: fingerprint: stale: ")
    assert err[0].endswith("`cli.py extract --backbone b --overwrite`)")
    assert not Path("predictions").exists()
