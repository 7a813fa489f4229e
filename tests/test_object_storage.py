"""Stores on object storage (fsspec URLs) are read like local ones; writing one is refused in one line."""

import fsspec
import pandas as pd
import pytest

from pipeline.config import BackboneParams
from pipeline.errors import PipelineError
from pipeline.cache.extract import extract
from pipeline.matching.match import match_store
from pipeline.cache.describe import describe
from pipeline.cache.verify import verify


@pytest.fixture
def remote(demo_stores):
    """The demo's vae-sd3 store uploaded to an in-memory fsspec filesystem (as it would be to s3://)."""
    memory = fsspec.filesystem("memory")
    memory.put(str(demo_stores["stores"]["vae-sd3"]), "/bucket/vae-sd3.zarr", recursive=True)
    yield "memory://bucket/vae-sd3.zarr"
    memory.rm("/bucket", recursive=True)


def test_match_and_verify_read_a_store_from_a_url(demo_stores, remote):
    pairs = demo_stores["pairs"]
    pd.testing.assert_frame_equal(match_store(remote, pairs), match_store(demo_stores["stores"]["vae-sd3"], pairs))
    problems, summary = verify(remote)
    assert problems == [] and "30/30 images done" in summary
    assert describe(remote).startswith(f"{remote}: features store")


def test_writing_to_a_url_is_refused(demo_stores):
    params = BackboneParams(kind="vae-sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3",
                            layers=["latent"], timesteps=[261], ensemble=1, noise=False)
    with pytest.raises(PipelineError, match=r"^memory://bucket/x.zarr: stores are written to a local or shared "
                                            r"filesystem .*; write locally, then `dvc push` or sync it$"):
        extract(params, "x", demo_stores["latents"]["tiny-sd3"], "memory://bucket/x.zarr")
