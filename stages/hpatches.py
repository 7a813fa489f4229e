"""DVC stages over HPatches (params: datasets.hpatches), DIFT's homography protocol:
`hpatches-extract@<backbone>` (its store of the dataset's images), `hpatches-match@<backbone>` (a row per pair
and variant) and `hpatches-evaluate` (accuracies at 1, 3 and 5 px -> metrics/)."""

import sys
from pathlib import Path

from pipeline import cluster
from pipeline.config import load_params
from pipeline.evaluation import homography
from pipeline.workflows import hpatches
from stages import run


def main(step: str, name: str | None = None) -> None:
    params = load_params()
    dataset = params.datasets.hpatches
    if step == "extract":
        with cluster.connect(params.dask.scheduler, params.dask.workers) as client:
            # Under DVC, a changed dependency means "rebuild": see stages/extract.py.
            hpatches.extract_store(params, name, replace="outdated", client=client)
    elif step == "match":
        hpatches.match_to_file(params, name, Path(dataset.predictions) / f"{name}.parquet")
    else:
        paths = [Path(dataset.predictions) / f"{backbone}.parquet" for backbone in dataset.backbones]
        print(homography.write_metrics(paths, Path("metrics/hpatches")))


if __name__ == "__main__":
    run(main, *sys.argv[1:])
