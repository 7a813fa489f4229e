"""DVC stage `model@<name>`: write models/<name> (params: models.<name>)."""

import sys

from pipeline.config import load_params
from pipeline.models import materialise


def main(name: str) -> None:
    model = load_params().models[name]
    materialise(model.source, f"models/{name}", model.seed)


if __name__ == "__main__":
    main(sys.argv[1])
