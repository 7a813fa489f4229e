"""Distributed runs on dask.distributed: a LocalCluster of N worker processes, or a running scheduler.

Work is split into independent tasks (a shard of images for extract, a batch of target images for
match); results are identical to a single-process run because every task's output depends only on
its own items, and the driver puts them back in the single-process order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.errors import PipelineError


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int = 1) -> Iterator[object | None]:
    """A dask Client, or None for a plain in-process run (no scheduler, at most one worker).

    `workers` processes with one thread each: torch, FAISS and numpy bring their own threads, and
    one GPU belongs to one worker (see `worker_device`).
    """
    if not scheduler and workers <= 1:
        yield None
        return
    from distributed import Client, LocalCluster  # distributed: seconds to import; only a cluster needs it

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise PipelineError(None, "scheduler", f"cannot reach dask scheduler {scheduler!r} ({exc})") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def worker_rank() -> int | None:
    """This process's worker number in a LocalCluster (0..N-1), None outside dask workers."""
    try:
        from distributed import get_worker  # distributed: seconds to import; only a dask worker gets here

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


def worker_device(device: str) -> str:
    """`cuda` on a LocalCluster worker becomes `cuda:<rank mod GPUs>`: one worker per GPU.

    Workers of a remote cluster keep `cuda` and see the GPU their launcher gave them
    (e.g. `CUDA_VISIBLE_DEVICES`, or dask-cuda's LocalCUDACluster).
    """
    rank = worker_rank()
    if device != "cuda" or rank is None:
        return device
    import torch  # torch: seconds to import, and the stages that only score (evaluate) never place a GPU

    count = torch.cuda.device_count()
    return f"cuda:{rank % count}" if count else device


def shards(items: list, workers: int, per_worker: int = 4) -> list[list]:
    """Contiguous shards, a few per worker so that a slow shard does not hold the others up."""
    count = max(1, min(len(items), workers * per_worker))
    size = -(-len(items) // count)
    return [items[i:i + size] for i in range(0, len(items), size)]


def workers_of(client) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1)["workers"])) if client is not None else 1
