"""`cli.py verify` finds what interrupted runs, bad data or edits leave in a store, image by image."""

import fcntl
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import cli
from pipeline.config import BackboneParams
from pipeline.errors import PipelineError
from pipeline.cache.extract import expected_fingerprint, extract
from pipeline.cache.verify import verify


@pytest.fixture
def copy(demo_stores, tmp_path):
    return shutil.copytree(demo_stores["stores"]["tiny-sd3"], tmp_path / "tiny-sd3.zarr")


def test_sound_store_passes(demo_stores, copy):
    problems, summary = verify(copy)
    assert problems == []
    assert "features store, 30/30 images done, 2 layer(s), 8 arrays checked" in summary  # features, shift, scale, overflow
    result = CliRunner().invoke(cli, ["verify", "--store", str(copy)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK")


def test_damage_is_reported_per_image(copy):
    root = zarr.open_group(copy, mode="r+", use_consolidated=False)
    images = root["image"][:]
    (copy / "transformer_blocks.1" / "features" / "c" / "5" / "0" / "0" / "0" / "0").unlink()  # a lost chunk
    values = root["transformer_blocks.3/features"][3]
    values[0, 1, 1, :4] = np.inf
    root["transformer_blocks.3/features"][3] = values
    root["images/done"][7] = False
    (copy / "transformer_blocks.1" / "features" / "c" / "x.partial").write_bytes(b"half")
    determinants = dict(root.attrs["determinants"], seed=5)
    root.attrs["determinants"] = determinants

    problems, _ = verify(copy)
    found = {(p.image, p.where): p.reason for p in problems}
    assert found[(images[5], "transformer_blocks.1/features")] == (
        "missing: flagged done but never written, or deleted (chunk transformer_blocks.1/features/c/5/0/0/0/0: missing); "
        "`cli.py extract` (or `encode`) computes the image again")
    assert found[(images[3], "transformer_blocks.3/features")] == "4 non-finite values"
    assert found[(images[7], "images/done")] == "not done (resume the stage that writes it)"
    assert "does not match the recorded parameters" in found[(None, "fingerprint")]
    assert (None, "transformer_blocks.1/features/c/x.partial") in found
    assert len(problems) == 5
    result = CliRunner().invoke(cli, ["verify", "--store", str(copy)])
    assert result.exit_code == 1
    assert f"  {images[3]}: transformer_blocks.3/features: 4 non-finite values" in result.output.splitlines()
    assert result.output.strip().endswith("5 problem(s)")


def test_fingerprint_against_parameters(demo_stores):
    path, latents = demo_stores["stores"]["tiny-sd3"], demo_stores["latents"]["tiny-sd3"]
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3",
                            layers=["transformer_blocks.1", "transformer_blocks.3"], timesteps=[261], ensemble=1)
    assert verify(path, expected_fingerprint(params, latents))[0] == []
    problems, _ = verify(path, expected_fingerprint(replace(params, ensemble=4), latents))
    assert [p.where for p in problems] == ["fingerprint"]
    assert "built with other parameters than params.yaml gives" in problems[0].reason


def test_a_second_writer_is_refused(demo_stores, tmp_path):
    out = tmp_path / "vae-sd3.zarr"
    params = BackboneParams(kind="vae-sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3",
                            layers=["latent"], timesteps=[261], ensemble=1, noise=False)
    lock = tmp_path / "vae-sd3.zarr.lock"
    with open(lock, "a+") as held:  # another process's lock: its own open file description
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match=r"vae-sd3.zarr: another process is writing this store \(it holds "
                                                r".*vae-sd3.zarr.lock\); wait for it to finish or stop it"):
            extract(params, "vae-sd3", demo_stores["latents"]["tiny-sd3"], out)
    assert not out.exists()  # the refused writer touched nothing
    extract(params, "vae-sd3", demo_stores["latents"]["tiny-sd3"], out)  # the lock is released
    assert not (tmp_path / "vae-sd3.zarr.lock").exists()
    assert json.loads((out / "zarr.json").read_text())["attributes"]["name"] == "vae-sd3"
