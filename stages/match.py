"""DVC stage `match@<backbone>`: predictions for every pair from the backbone's store."""

import sys
from pathlib import Path

import pandas as pd

from pipeline.config import load_params
from pipeline.match import match_store


def main(name: str) -> None:
    params = load_params()
    pairs = pd.read_parquet(params.data.pairs)
    predictions = match_store(params.store_path(name), pairs, protocol=params.match.protocol, top_k=params.match.top_k,
                              transform_specs=params.match.transforms_for(name))
    out = Path(params.match.predictions) / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(out, index=False)


if __name__ == "__main__":
    main(sys.argv[1])
