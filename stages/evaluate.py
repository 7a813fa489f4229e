"""DVC stage `evaluate`: PCK of every backbone's predictions, each backbone's best variant with its bootstrap
interval, the differences between backbones and the breakdowns by difficulty -> metrics/. A backbone not
matched yet (a partial study: `dvc repro -s match@sd3 evaluate report`) is left out, and named."""

import sys
from pathlib import Path

import pandas as pd

from pipeline import cluster
from pipeline.evaluation import metrics
from pipeline.evaluation.findings import Findings
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
    findings = Findings.compute(table, paths, pd.read_parquet(params.data.pairs), params.report.resamples,
                                params.report.seed)
    findings.write()
    print(metrics.format_headline(table))


if __name__ == "__main__":
    run(main)
