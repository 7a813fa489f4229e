"""DVC stage `report`: figures and reports/index.md from the stores and the PCK table."""

import pandas as pd

from pipeline.evaluation import figures, metrics
from pipeline.config import load_params
from stages import run


def main() -> None:
    params = load_params()
    table = pd.read_csv("metrics/pck.csv")
    evaluated = set(table["backbone"])  # a partial study reports the backbones it has
    stores = {name: str(params.store_path(name)) for name in params.backbones if name in evaluated}
    figures.write_report("reports", table, metrics.curve_tables(table), stores,
                         pd.read_parquet(params.data.pairs), pd.read_parquet(params.data.images), params.data.root)


if __name__ == "__main__":
    run(main)
