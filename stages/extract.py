"""DVC stage `extract@<backbone>`: one backbone's features store from its latents store."""

import sys

from pipeline import cluster
from pipeline.workflows import fidelity
from pipeline.config import load_params
from stages import run


def main(name: str) -> None:
    params = load_params()
    # Under DVC, a changed dependency means "rebuild": a store built with other parameters, model or code
    # is replaced (and the stage says so); one with the same fingerprint resumes; an unreadable one is left.
    with cluster.connect(params.dask.scheduler, params.dask.workers) as client:
        fidelity.extract_measured(params, name, params.store_path(name), replace="outdated", client=client,
                                  on_error=params.on_error, check_disk=params.check_disk)


if __name__ == "__main__":
    run(main, sys.argv[1])
