"""Match-time feature transforms: the DiT fixes, run on cached features.

Diffusion transformers' features carry a few "massive activation" channels whose magnitude dwarfs the
rest, so cosine similarity sees little else (DiTF, 2025). A transform spec is one or more steps joined
by `+`, applied left to right on each cell's channel vector:

- `raw`: the stored features;
- `drop:auto` / `drop:3,17`: zero the massive channels (detected, or given);
- `layernorm`: per-cell LayerNorm over channels, without affine;
- `adaln`: LayerNorm, then the stored modulation `(1 + scale) * x + shift` (transformer blocks only).

e.g. `drop:auto+adaln` is DiTF's recipe. Detection rule (`drop:auto`): a channel is massive when its
median |activation| over the cells of a sample of images exceeds MASSIVE_RATIO (50) times the median
of that statistic over all channels, and at most MAX_MASSIVE (8) channels, the largest, are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

MASSIVE_RATIO = 50.0
MAX_MASSIVE = 8
LAYERNORM_EPS = 1e-6  # as the AdaLN LayerNorms of SD3 and FLUX


@dataclass(frozen=True)
class Step:
    kind: str  # drop | layernorm | adaln
    channels: tuple[int, ...] | None = None  # drop: explicit channels; None = auto


def parse(spec: str) -> tuple[Step, ...]:
    """`drop:auto+adaln` -> (Step('drop'), Step('adaln')); `raw` -> ()."""
    steps = []
    for part in spec.strip().split("+"):
        name, _, argument = part.strip().partition(":")
        if name == "raw" and not argument:
            continue
        if name in ("layernorm", "adaln") and not argument:
            steps.append(Step(name))
        elif name == "drop" and argument == "auto":
            steps.append(Step("drop"))
        elif name == "drop" and argument:
            try:
                channels = tuple(sorted({int(c) for c in argument.split(",")}))
            except ValueError:
                raise PipelineError(None, "transform", f"bad channel list in {part!r}; e.g. drop:3,17") from None
            if channels[0] < 0:
                raise PipelineError(None, "transform", f"negative channel in {part!r}; channels count from 0")
            steps.append(Step("drop", channels))
        else:
            raise PipelineError(None, "transform", f"unknown transform {part!r} in {spec!r}; expected raw, layernorm, "
                                "adaln, drop:auto or drop:i,j, joined with +")
    return tuple(steps)


def canonical(spec: str) -> str:
    """The one spelling of a spec: `drop:03,1 + adaln` -> `drop:1,3+adaln`, `` -> `raw`."""
    parts = [step.kind if step.kind != "drop" else
             "drop:" + ("auto" if step.channels is None else ",".join(map(str, step.channels))) for step in parse(spec)]
    return "+".join(parts) or "raw"


def check_configured(spec: str, configured: list[str], store: str) -> None:
    """Refuse a transform the store's params do not configure (`match.transforms`): each spelling would
    otherwise cost its own maps and search index."""
    if spec not in configured:
        shown = spec if len(spec) <= 40 else spec[:40] + "…"
        raise PipelineError(None, "transform", f"{shown!r} is not configured for {store!r} (match.transforms: "
                            f"{configured}); add it to params.yaml to use it")


def massive_channels(magnitudes: np.ndarray) -> tuple[int, ...]:
    """Channels whose median |activation| (`magnitudes`, one per channel) is massive (see module doc)."""
    typical = float(np.median(magnitudes))
    ratio = magnitudes / max(typical, 1e-12)
    candidates = np.flatnonzero(ratio > MASSIVE_RATIO)
    largest = candidates[np.argsort(-ratio[candidates])][:MAX_MASSIVE]
    return tuple(sorted(int(c) for c in largest))


def channel_magnitudes(features: np.ndarray) -> np.ndarray:
    """Median |activation| per channel over all cells of (..., C) features."""
    return np.median(np.abs(features.reshape(-1, features.shape[-1])), axis=0)


def layernorm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYERNORM_EPS)


def apply(steps: tuple[Step, ...], features: np.ndarray, auto_channels: tuple[int, ...] = (),
          shift: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """Apply the steps to (h, w, C) features; `auto_channels` serve `drop:auto`."""
    x = features
    for step in steps:
        if step.kind == "drop":
            channels = list(step.channels if step.channels is not None else auto_channels)
            if channels and max(channels) >= x.shape[-1]:
                raise PipelineError(None, "transform", f"channel {max(channels)} out of range (the layer has {x.shape[-1]})")
            x = x.copy()
            x[..., channels] = 0.0
        elif step.kind == "layernorm":
            x = layernorm(x)
        elif step.kind == "adaln":
            if shift is None or scale is None:
                raise PipelineError(None, "transform", "adaln needs the stored shift/scale, which only transformer "
                                    "block layers have")
            x = layernorm(x) * (1.0 + scale) + shift
    return x.astype(np.float32, copy=False)


def channel_statistics(features: np.ndarray, top: int = 10) -> str:
    """A table of the `top` channels by median |activation|: median, max, and ratio to the typical channel."""
    flat = np.abs(features.reshape(-1, features.shape[-1]))
    median, peak = np.median(flat, axis=0), flat.max(axis=0)
    typical = max(float(np.median(median)), 1e-12)
    order = np.argsort(-median)[:top]
    lines = [f"{len(median)} channels; typical median |x| {typical:.4g}; massive: > {MASSIVE_RATIO:g} x typical",
             f"{'channel':>8} {'median |x|':>12} {'max |x|':>12} {'x typical':>10}"]
    lines += [f"{c:>8} {median[c]:>12.4g} {peak[c]:>12.4g} {median[c] / typical:>10.1f}" for c in order]
    return "\n".join(lines)
