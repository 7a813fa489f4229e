"""DVC stage `report`: reports/index.md (and its twin index.json) with its figures, from metrics/ and the stores."""

from pathlib import Path

import json

import pandas as pd

from pipeline.evaluation import report
from pipeline.evaluation.findings import Findings
from pipeline.config import load_params
from stages import run


def main() -> None:
    params = load_params()
    findings = Findings.read(backbones=params.backbones)
    stores = {name: str(params.store_path(name)) for name in params.backbones if name in findings.best}
    hpatches = Path("metrics/hpatches/accuracy.csv")
    davis = Path("metrics/davis/jf.csv"), Path("metrics/davis/jf.json")
    report.write_report("reports", findings, stores, pd.read_parquet(params.data.pairs),
                        pd.read_parquet(params.data.images), params.data.root, params.report.shown,
                        pd.read_csv(hpatches) if hpatches.exists() else None,
                        (pd.read_csv(davis[0]), json.loads(davis[1].read_text()))
                        if all(p.exists() for p in davis) else None)


if __name__ == "__main__":
    run(main)
