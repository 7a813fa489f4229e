"""Every shipped parameters file (params.yaml and each of profiles/) is a pipeline DVC can plan, and each
stage depends on what it reads only, so that any subset of backbones runs without the others' models."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_project

PROFILES = [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A scratch git repository holding the project's code and dvc.yaml (no outputs)."""
    root = copy_project(tmp_path_factory.mktemp("profiles") / "project")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def planned(scratch: Path, profile: Path, *targets: str) -> set[str]:
    """The stages `dvc repro --dry` would run under `profile`, from nothing. `--force`: DVC 3.67's dry run
    hashes the dependencies of a stage whose upstream has not run and fails on the first that is missing
    (treeverse/dvc#9021), so a dry run from a fresh clone needs it whatever the pipeline."""
    shutil.copy(profile, scratch / "params.yaml")
    _dvc(scratch, "dag")
    out = _dvc(scratch, "repro", "--dry", "--force", *targets)
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name for p in PROFILES])
@pytest.mark.slow
def test_every_profile_parses_and_plans_every_stage(scratch, profile):
    params = yaml.safe_load(profile.read_text())
    expected = {"prepare", "evaluate", "report"} | {f"download@{d}" for d in params.get("download") or {}} \
        | {f"model@{m}" for m in params.get("models") or {}} | {f"encode@{e}" for e in params.get("encoders") or {}} \
        | {f"canvas@{c}" for c in params.get("canvases") or {}} \
        | {f"{stage}@{b}" for b in params["backbones"] for stage in ("extract", "match")} \
        | {"hpatches-evaluate"} | {f"hpatches-{step}@{b}" for b in params["datasets"]["hpatches"]["backbones"]
                                  for step in ("extract", "match")} \
        | {"davis-evaluate"} | {f"davis-{step}@{b}" for b in params["datasets"]["davis"]["backbones"]
                               for step in ("extract", "propagate")}
    assert planned(scratch, profile) == expected


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name for p in PROFILES])
def test_every_profile_holds_every_parameter_a_stage_names(profile):
    # DVC reads a stage's `params:` from params.yaml itself (no schema defaults) and refuses to run a stage
    # whose key is absent, which its dry run does not check: a real profile once lacked `check_disk`.
    params = yaml.safe_load(profile.read_text())
    named = {key for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
             for key in stage.get("do", stage).get("params", []) if "${" not in key}
    for key in named:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{profile.name}: {key} (named by dvc.yaml) is missing"
            node = node[part]


@pytest.mark.parametrize("backbone, upstream", [
    ("sd2", {"download@spair71k", "prepare", "model@sd2-1", "encode@sd2-768"}),
    ("vae-sd3", {"download@spair71k", "prepare", "model@sd3-medium", "encode@sd3-768"}),
    ("dinov2", {"download@spair71k", "prepare", "model@dinov2-base", "canvas@pixels-840"}),
])
def test_a_backbone_needs_only_its_own_model_and_latents(scratch, backbone, upstream):
    # The real profile: extracting SD2.1 must not first fetch FLUX.1-dev (33.7 GB, gated), CLIP-H or DINOv2.
    assert planned(scratch, REPO / "profiles" / "spair71k.yaml", f"extract@{backbone}") == upstream | {f"extract@{backbone}"}


def test_a_backbone_on_hpatches_needs_only_its_own_model_and_the_dataset(scratch):
    # Not SPair (no download@spair71k, no prepare) and not the other models.
    assert planned(scratch, REPO / "profiles" / "spair71k.yaml", "hpatches-extract@sd3") == \
        {"download@hpatches", "model@sd3-medium", "hpatches-extract@sd3"}
    assert planned(scratch, REPO / "profiles" / "spair71k.yaml", "davis-extract@sd2") == \
        {"download@davis", "model@sd2-1", "davis-extract@sd2"}
