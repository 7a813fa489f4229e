"""`dvc repro` end to end in a scratch git repository holding a copy of the project."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import copy_project

pytestmark = pytest.mark.slow  # `dvc repro` of the whole demo, three times


def _run(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def project(tmp_path):
    root = copy_project(tmp_path / "project")
    # DVC's bookkeeping is what is under test: two backbones on one tiny model keep it to a few minutes
    # (the whole demo runs in the README's quickstart and in tests/test_examples.py).
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["backbones"] = {name: params["backbones"][name] for name in ("sd3", "vae-sd3")}
    params["backbones"]["sd3"] |= {"layers": ["transformer_blocks.1", "transformer_blocks.3"], "timesteps": [261]}
    params["download"]["demo"]["demo"]["sources_per_category"] = 1  # 15 images
    params["encoders"] = {"tiny-sd3": params["encoders"]["tiny-sd3"]}
    params["canvases"] = {}
    params["models"] = {"tiny-sd3": params["models"]["tiny-sd3"]}
    params["match"]["transforms"] = {k: v for k, v in params["match"]["transforms"].items() if k in params["backbones"]}
    hpatches = params["datasets"]["hpatches"]
    hpatches["backbones"] = {name: hpatches["backbones"][name] for name in ("sd3", "vae-sd3")}
    params["download"]["hpatches-demo"]["demo"]["sequences"] = 2  # 12 images, 10 pairs
    davis = params["datasets"]["davis"]
    davis["backbones"] = {name: davis["backbones"][name] for name in ("sd3", "vae-sd3")}
    params["download"]["davis-demo"]["demo"] |= {"sequences": 2, "frames": 4}  # 8 frames
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, "git", "init", "-q")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def _leaves(node: dict):
    """The innermost dicts of metrics/pck.json: one per variant."""
    if "per_image" in node:
        yield node
        return
    for child in node.values():
        yield from _leaves(child)


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_repro_then_noop_then_only_dependents(project):
    dvc = (sys.executable, "-m", "dvc")
    first = _run(project, *dvc, "repro")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert all(model["source"].startswith("tiny:") for model in params["models"].values())  # the demo's own
    expected = {"download@demo", "prepare"} | {f"model@{m}" for m in params["models"]} \
        | {f"encode@{e}" for e in params["encoders"]} | {f"extract@{b}" for b in params["backbones"]} \
        | {f"match@{b}" for b in params["backbones"]} | {"evaluate", "report"} \
        | {"download@hpatches-demo", "hpatches-evaluate"} \
        | {f"hpatches-{step}@{b}" for b in params["datasets"]["hpatches"]["backbones"] for step in ("extract", "match")} \
        | {"download@davis-demo", "davis-evaluate"} \
        | {f"davis-{step}@{b}" for b in params["datasets"]["davis"]["backbones"] for step in ("extract", "propagate")}
    assert _stages_run(first) == expected
    assert (project / "data" / "prepared" / "pairs.parquet").is_file()
    for backbone in params["backbones"]:
        assert (project / "store" / f"{backbone}.zarr" / "zarr.json").is_file()
    assert _stages_run(_run(project, *dvc, "repro")) == set()

    # The CLI reads its defaults from params.yaml: the same predictions as the stage, row for row.
    _run(project, sys.executable, "cli.py", "match", "--store", "store/sd3.zarr", "--out", "cli-sd3.parquet")
    stage, by_cli = (pd.read_parquet(project / name) for name in ("predictions/sd3.parquet", "cli-sd3.parquet"))
    assert set(stage["transform"]) == set(params["match"]["transforms"]["sd3"])  # not just the built-in "raw"
    pd.testing.assert_frame_equal(by_cli, stage)
    coverage = json.loads((project / "metrics" / "pck.json").read_text())["PCK@0.1"]["sd3"]
    pairs = len(pd.read_parquet(project / "data" / "prepared" / "pairs.parquet"))
    assert {leaf["split_pairs"] for leaf in _leaves(coverage)} == {pairs}

    params["backbones"]["vae-sd3"]["latent"] = "sample"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert (project / "reports" / "index.md").is_file() and (project / "metrics" / "pck.json").is_file()
    # model@ reads `backbones` (which components to fetch): it runs, keeps or rebuilds the same bytes, and
    # nothing downstream of the folder runs again.
    assert _stages_run(_run(project, *dvc, "repro")) == {"model@tiny-sd3", "extract@vae-sd3", "match@vae-sd3",
                                                         "evaluate", "hpatches-extract@vae-sd3", "hpatches-match@vae-sd3",
                                                         "hpatches-evaluate", "davis-extract@vae-sd3",
                                                         "davis-propagate@vae-sd3", "davis-evaluate", "report"}
    shown = _run(project, *dvc, "metrics", "show", "metrics/best")
    assert all(f"metrics/best/{b}.json" in shown for b in params["backbones"])
    shown = _run(project, *dvc, "metrics", "show", "metrics/hpatches/accuracy.json")
    assert all(f"{b}.accuracy.all <= 3 px" in shown for b in ("sd3", "vae-sd3")), shown
    plotted = pd.read_csv(project / "metrics" / "hpatches" / "plot.csv")
    assert set(plotted["backbone"]) == {"sd3", "vae-sd3"} and sorted(set(plotted["threshold"])) == [1, 3, 5]
    assert "## Geometric correspondence: HPatches homography estimation" in (project / "reports" / "index.md").read_text()
    shown = _run(project, *dvc, "metrics", "show", "metrics/davis/jf.json")
    assert all(f"{b}.J&F" in shown for b in ("sd3", "vae-sd3")), shown
    assert "## Temporal correspondence: DAVIS-2017 label propagation" in (project / "reports" / "index.md").read_text()
    # `dvc plots show`: one plot per question, one series per backbone (not per variant).
    for curve in ("pck_vs_depth", "pck_vs_timestep"):
        series = pd.read_csv(project / "metrics" / "plots" / f"{curve}.csv")["series"]
        assert set(series.str.split(" ").str[0]) == set(params["backbones"]) and series.nunique() == len(params["backbones"])

    # A partial study: a backbone not matched yet is left out of evaluate and report, and named.
    (project / "predictions" / "vae-sd3.parquet").unlink()
    partial = subprocess.run((*dvc, "repro", "-s", "evaluate", "report"), cwd=project, capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert partial.returncode == 0, partial.stdout + partial.stderr
    assert "not matched yet, left out: vae-sd3" in partial.stderr
    assert sorted(p.name for p in (project / "metrics" / "best").iterdir()) == ["sd3.json"]
    assert set(pd.read_csv(project / "metrics" / "pck.csv")["backbone"]) == {"sd3"}
    text = (project / "reports" / "index.md").read_text()
    before, rest = text.split("## Geometric correspondence: HPatches", 1)
    spair = before + rest.split("## Similarity heatmaps", 1)[1]  # HPatches' sections: vae-sd3 is matched there
    assert "vae-sd3" not in spair and "| vae-sd3 " in rest.split("## Similarity heatmaps", 1)[0]
