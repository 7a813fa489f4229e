"""DVC stage `model@<name>`: write models/<name> (params: models.<name>; the components that the
encoders and backbones naming it load)."""

import sys

from pipeline.config import load_params
from pipeline.workflows.fetch import components, materialise
from stages import run


def main(name: str) -> None:
    params = load_params()
    model = params.models[name]
    materialise(model.source, f"models/{name}", model.seed, model.revision, components(params, name))


if __name__ == "__main__":
    run(main, sys.argv[1])
