"""DVC stage `evaluate`: PCK of every backbone's predictions -> metrics and plot tables. A backbone not
matched yet (a partial study: `dvc repro -s match@sd3 evaluate report`) is left out, and named."""

import sys
from pathlib import Path

from pipeline import cluster
from pipeline.evaluation import metrics
from pipeline.config import load_params
from stages import run


def main() -> None:
    params = load_params()
    paths = {name: Path(params.match.predictions) / f"{name}.parquet" for name in params.backbones}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        print(f"evaluate: not matched yet, left out: {', '.join(missing)}", file=sys.stderr)
    paths = [path for path in paths.values() if path.exists()]
    with cluster.connect(params.dask.scheduler, params.dask.workers) as client:
        table = metrics.score_files(paths, client, thresholds=params.match.thresholds)
    metrics.write_metrics(table, "metrics/pck.json", "metrics/pck.csv", best_dir=metrics.BEST_DIR)
    by_layer, by_timestep = metrics.curve_tables(table)
    by_layer.to_csv("metrics/pck_vs_layer.csv", index=False, float_format="%.6f")
    by_timestep.to_csv("metrics/pck_vs_timestep.csv", index=False, float_format="%.6f")
    print(metrics.format_headline(table))


if __name__ == "__main__":
    run(main)
