"""DVC stages over DAVIS-2017 (params: datasets.davis), DIFT's label propagation protocol:
`davis-extract@<backbone>` (its store of the split's frames), `davis-propagate@<backbone>` (masks as DAVIS's
PNGs, a row per object and variant) and `davis-evaluate` (J, F and J&F -> metrics/)."""

import sys
from pathlib import Path

from pipeline import cluster
from pipeline.config import load_params
from pipeline.evaluation import video_segmentation
from pipeline.workflows import davis
from stages import run


def main(step: str, name: str | None = None) -> None:
    params = load_params()
    dataset = params.datasets.davis
    predictions = Path(dataset.predictions)
    if step == "extract":
        with cluster.connect(params.dask.scheduler, params.dask.workers) as client:
            # Under DVC, a changed dependency means "rebuild": see stages/extract.py.
            davis.extract_store(params, name, replace="outdated", client=client)
    elif step == "propagate":
        davis.propagate_to_files(params, name, predictions / name, predictions / f"{name}.parquet")
    else:
        paths = [predictions / f"{backbone}.parquet" for backbone in dataset.backbones]
        print(video_segmentation.write_metrics(paths, Path("metrics/davis")))


if __name__ == "__main__":
    run(main, *sys.argv[1:])
