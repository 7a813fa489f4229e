"""`params.yaml`: every knob of the pipeline, read into plain dataclasses.

Unknown keys are refused, so a typo in params.yaml fails loudly instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class DataParams:
    root: str = "data/demo"
    split: str = "test"
    layout: str | None = None  # None: every file in PairAnnotation/<split>; "large"/"small": a Layout list
    categories: list[str] = field(default_factory=list)  # empty: all
    pairs: str = "data/prepared/pairs.parquet"
    images: str = "data/prepared/images.parquet"


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    sources_per_category: int = 2


@dataclass(frozen=True)
class Params:
    data: DataParams = DataParams()
    demo: DemoParams = DemoParams()


def _section(cls, values: dict | None, where: str):
    values = values or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineError(where, unknown[0], f"unknown parameter; expected one of {sorted(known)}")
    return cls(**values)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(path, None, "parameters file is missing") from None
    except yaml.YAMLError as exc:
        raise PipelineError(path, None, f"unreadable YAML ({str(exc).splitlines()[0]})") from None
    sections = {f.name: f.type for f in fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise PipelineError(path, unknown[0], f"unknown section; expected one of {sorted(sections)}")
    return Params(
        data=_section(DataParams, raw.get("data"), f"{path}: data"),
        demo=_section(DemoParams, raw.get("demo"), f"{path}: demo"),
    )
