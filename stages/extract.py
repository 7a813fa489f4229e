"""DVC stage `extract@<backbone>`: one backbone's features store from its latents store."""

import sys

from pipeline.config import load_params
from pipeline.extract import extract


def main(name: str) -> None:
    params = load_params()
    backbone = params.backbone(name)
    # Under DVC, changed parameters mean "rebuild": a store with another fingerprint is replaced;
    # one with the same fingerprint resumes.
    extract(backbone, name, params.latents_path(backbone.latents), params.store_path(name), overwrite=True)


if __name__ == "__main__":
    main(sys.argv[1])
