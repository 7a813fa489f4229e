"""DVC stage `match@<backbone>`: predictions for every pair from the backbone's store."""

import sys
from pathlib import Path

import pandas as pd

from pipeline import cluster
from pipeline.cache.current import check_current
from pipeline.config import load_params
from pipeline.matching.match import match_to_file
from stages import run


def main(name: str) -> None:
    params = load_params()
    # A store params.yaml and the code would now build otherwise (e.g. after a library upgrade, which DVC
    # does not see) is refused in one line, naming what differs, before any work.
    check_current(params.store_path(name), params, allow_stale=False, anyway=None)
    pairs = pd.read_parquet(params.data.pairs)
    with cluster.connect(params.dask.scheduler, params.dask.workers) as client:
        match_to_file(params.store_path(name), pairs, Path(params.match.predictions) / f"{name}.parquet",
                      protocols=params.match.protocols, statistics=params.match.statistics,
                      device=params.match.device, transform_specs=params.match.transforms_for(name), client=client, on_error=params.on_error)


if __name__ == "__main__":
    run(main, sys.argv[1])
