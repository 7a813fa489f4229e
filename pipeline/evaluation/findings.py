"""The study's findings under metrics/: what the `evaluate` stage writes and the report reads.

- `pck.csv`: every PCK (tidy: variant, protocol, threshold family, kind, category, alpha);
- `pck.json`: PCK@0.1 nested by variant, for `dvc metrics show`;
- `best/<backbone>.json`: each backbone's best variant in the headline setting (DIFT's), its PCK@0.1 and
  its 95% bootstrap interval;
- `differences.json`: the difference between every two backbones' best variants, with its interval;
- `pck_by_flag.csv`: the best variants' PCK per value of SPair's difficulty flags;
- `plots/pck_vs_depth.csv`, `plots/pck_vs_timestep.csv`: the `dvc plots` curves, one series per backbone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.evaluation import bootstrap, metrics

METRICS = Path("metrics")


@dataclass
class Findings:
    table: pd.DataFrame  # metrics.pck_table of every predictions table
    best: dict[str, dict]  # metrics.best_variants, each with its 95% interval (per_image_ci95)
    differences: pd.DataFrame  # bootstrap.intervals' differences
    flags: pd.DataFrame  # metrics.by_flag
    bootstrap: dict  # {"resamples": R, "seed": S, "confidence": 0.95}

    @classmethod
    def compute(cls, table: pd.DataFrame, predictions, pairs: pd.DataFrame, resamples: int = 1000,
                seed: int = 0) -> Findings:
        """From a pck_table and the predictions tables it was scored from (read again for the best variants'
        rows only) and the pairs table (for the difficulty flags)."""
        best = metrics.best_variants(table)
        outcomes = metrics.pair_outcomes(predictions, best)
        per_backbone, differences = bootstrap.intervals(outcomes, resamples, seed)
        for row in per_backbone.itertuples():
            best[row.backbone]["per_image_ci95"] = [round(row.low, 6), round(row.high, 6)]
        return cls(table, best, differences, metrics.by_flag(outcomes, pairs),
                   {"resamples": resamples, "seed": seed, "confidence": bootstrap.CONFIDENCE})

    @property
    def setting(self) -> dict:
        return metrics.headline_setting(self.table)

    def write(self, root: str | Path = METRICS) -> None:
        root = Path(root)
        metrics.write_metrics(self.table, root / "pck.json", root / "pck.csv", root / "best", self.best)
        (root / "differences.json").write_text(json.dumps(
            {"setting": self.setting, "bootstrap": self.bootstrap,
             "differences": {f"{r.minuend} - {r.subtrahend}": {"difference": round(r.difference, 6),
                                                               "ci95": [round(r.low, 6), round(r.high, 6)],
                                                               "pairs": int(r.pairs)}
                             for r in self.differences.itertuples()}}, indent=2) + "\n")
        self.flags.to_csv(root / "pck_by_flag.csv", index=False, float_format="%.6f")
        by_depth, by_timestep = metrics.curve_tables(self.table)
        (root / "plots").mkdir(parents=True, exist_ok=True)
        by_depth.to_csv(root / "plots" / "pck_vs_depth.csv", index=False, float_format="%.6f")
        by_timestep.to_csv(root / "plots" / "pck_vs_timestep.csv", index=False, float_format="%.6f")

    @classmethod
    def read(cls, root: str | Path = METRICS, backbones=None) -> Findings:
        """What `write` wrote (of `backbones`, if given: a partial study reports the backbones it has)."""
        root = Path(root)
        table = pd.read_csv(root / "pck.csv")
        best = {path.stem: json.loads(path.read_text()) for path in sorted((root / "best").glob("*.json"))}
        saved = json.loads((root / "differences.json").read_text())
        differences = pd.DataFrame(
            [{"minuend": name.split(" - ")[0], "subtrahend": name.split(" - ")[1], "difference": d["difference"],
              "low": d["ci95"][0], "high": d["ci95"][1], "pairs": d["pairs"]} for name, d in saved["differences"].items()],
            columns=["minuend", "subtrahend", "difference", "low", "high", "pairs"])
        flags = pd.read_csv(root / "pck_by_flag.csv")
        if backbones is not None:
            keep = set(backbones)
            table = table[table["backbone"].isin(keep)]
            best = {name: scores for name, scores in best.items() if name in keep}
            differences = differences[differences["minuend"].isin(keep) & differences["subtrahend"].isin(keep)]
            flags = flags[flags["backbone"].isin(keep)]
        return cls(table.reset_index(drop=True), best, differences.reset_index(drop=True), flags, saved["bootstrap"])
