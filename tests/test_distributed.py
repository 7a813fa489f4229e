"""dask.distributed runs equal single-process runs: extract (images sharded across workers writing
one store), match (target images across workers) and evaluate (row groups across workers)."""

import pandas as pd
import pytest

from conftest import store_files
from pipeline import cluster
from pipeline.evaluation import metrics
from pipeline.config import BackboneParams
from pipeline.cache.extract import extract
from pipeline.matching.match import match_store, match_to_file

pytestmark = pytest.mark.slow  # a dask LocalCluster of worker processes per test


@pytest.fixture(scope="module")
def client():
    with cluster.connect(workers=2) as dask_client:
        yield dask_client


def test_two_local_workers(client):
    assert cluster.workers_of(client) == 2


@pytest.mark.parametrize("protocol", ["dift", "geoaware"])
def test_distributed_match_and_evaluate_equal_single_process(client, demo_stores, tmp_path, protocol):
    path, pairs = demo_stores["stores"]["tiny-sd3"], demo_stores["pairs"]
    specs = ["raw", "drop:auto+adaln"]
    single = match_store(path, pairs, protocols=[protocol], transform_specs=specs)
    out = match_to_file(path, pairs, tmp_path / "p.parquet", protocols=[protocol], transform_specs=specs, client=client)
    distributed = pd.read_parquet(out)
    assert len(distributed) == len(single) == pairs["kps_ids"].map(len).sum() * 2 * len(specs)
    pd.testing.assert_frame_equal(distributed, single)  # row for row
    pd.testing.assert_frame_equal(metrics.score_files([out], client, row_groups=5), metrics.pck_table(single))


def test_distributed_extract_writes_the_single_process_store(client, demo_stores, tmp_path):
    reference = demo_stores["stores"]["tiny-sd3"]
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3",
                            layers=["transformer_blocks.1", "transformer_blocks.3"], timesteps=[261], ensemble=1)
    out = extract(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], tmp_path / "tiny-sd3.zarr", client=client)
    assert store_files(out) == store_files(reference)


def test_distributed_pca_extract_fits_on_a_worker_and_writes_the_single_process_store(client, demo_stores, tmp_path):
    """pca:K's fit runs on a worker (client.submit), then the workers write with its axes: the same bytes as
    one process (axes in the metadata, every chunk)."""
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3",
                            layers=["transformer_blocks.1", "transformer_blocks.3"], timesteps=[261], ensemble=1,
                            storage="pca:16", fit_images=8)
    latents = demo_stores["latents"]["tiny-sd3"]
    single = extract(params, "tiny-sd3", latents, tmp_path / "single.zarr")
    distributed = extract(params, "tiny-sd3", latents, tmp_path / "distributed.zarr", client=client)
    files = store_files(single)
    assert any(name.endswith("features/zarr.json") and b"dift_cache.layer_pca" in data for name, data in files.items())
    assert store_files(distributed) == files


def test_shards_cover_every_item_once_in_order():
    items = list(range(37))
    shards = cluster.shards(items, workers=3)
    assert [i for shard in shards for i in shard] == items
    assert 3 <= len(shards) <= 12 and all(shards)  # at least one per worker, a few at most
