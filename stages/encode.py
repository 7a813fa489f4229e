"""DVC stage `encode@<encoder>`: every image of the prepared split through one VAE."""

import sys

import pandas as pd

from pipeline.config import load_params
from pipeline.cache.encode import encode
from stages import run


def main(name: str) -> None:
    params = load_params()
    images = pd.read_parquet(params.data.images)
    dataset = {"root": params.data.root, "split": params.data.split}
    # Under DVC, a changed dependency means "rebuild": see stages/extract.py.
    encode(params.encoder(name), images, params.data.root, params.latents_path(name), replace="outdated", dataset=dataset,
           on_error=params.on_error,
           check_disk=params.check_disk)


if __name__ == "__main__":
    run(main, sys.argv[1])
