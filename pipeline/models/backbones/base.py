"""What every backbone shares: the `Backbone` interface, the forward-hook capture they all use, and the
noising and modulation helpers the families share.

A backbone is built in two phases, so that the text encoders and the denoiser never share the device:
every category's prompt is encoded first (text encoders loaded, used once per category, freed), then
the denoiser is loaded. That is what diffusers' model CPU offload achieves, without hooks; `offload:
blocks` additionally streams the denoiser's blocks from host memory (diffusers group offloading), for
a denoiser larger than the card.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from pipeline.errors import PipelineError
from pipeline.models.backbones.parts import Parts

if TYPE_CHECKING:
    from pipeline.config import BackboneParams


class StopForward(Exception):
    """Raised by the last capture hook: nothing after the deepest requested layer runs."""


@contextmanager
def capture(model: torch.nn.Module, names: list[str], pick, inputs: bool = False):
    """Hooks on the modules `names` filling a dict name -> what `pick` makes of each module's output
    (`pick(name, output)`) or, with `inputs`, of the keyword arguments it is called with
    (`pick(name, module, kwargs)`, before it runs: FLUX's blocks are called with keywords).

    Once every name has fired, the hook raises StopForward; run the model inside `until_captured`.
    """
    modules = dict(model.named_modules())
    captured: dict[str, object] = {}

    def hook_for(name):
        def output_hook(module, args, output):
            captured[name] = pick(name, output)
            if len(captured) == len(names):
                raise StopForward

        def input_hook(module, args, kwargs):
            captured[name] = pick(name, module, kwargs)
            if len(captured) == len(names):
                raise StopForward

        return input_hook if inputs else output_hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name), with_kwargs=True) if inputs
               else modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def until_captured(call) -> None:
    try:
        call()
    except StopForward:
        pass


class Backbone:
    """A loaded model: `model_latent` maps a posterior sample to the model's input space, `noised`
    adds noise at timestep t, `run` returns {layer: {"features": (E, Y, X, C), ...}}.

    Construction encodes the prompts of `categories` (subclasses: `encode_prompts`), frees the text
    encoders, then loads the denoiser (`load_model`). A family's class names the kinds it implements
    (`kinds`, declared in pipeline/models/kinds.py)."""

    kinds: tuple[str, ...] = ()

    def __init__(self, params: BackboneParams, latents_attrs: dict, parts: Parts, categories: list[str] = ()):
        self.params, self.parts, self.device, self.dtype = params, parts, parts.device, parts.dtype
        self.scaling_factor = float(latents_attrs["scaling_factor"])
        self.shift_factor = float(latents_attrs.get("shift_factor") or 0.0)
        self.canvas = int(latents_attrs["canvas"])
        self.canvas_mode = latents_attrs.get("canvas_mode", "squash")
        prompts = {category: params.prompt.format(category=category) for category in sorted(set(categories))}
        with torch.no_grad():
            self.conditions = self.encode_prompts(prompts)
        parts.release()
        self.load_model()

    def encode_prompts(self, prompts: dict[str, str]) -> dict:
        """category -> the model's conditioning; the text encoders are dropped on return."""
        return {}

    def load_model(self) -> None:
        raise NotImplementedError

    def model_config(self) -> dict | None:
        """The loaded model's config values that set its canvas multiple (pipeline/models/kinds.py,
        `Kind.multiple_for`); None: the VAE's."""
        return None

    def denoiser(self) -> torch.nn.Module | None:
        """The network that makes the features (None for the VAE latents themselves)."""
        return None

    def available_layers(self) -> list[str]:
        raise NotImplementedError

    def check_layers(self, layers: list[str]) -> None:
        available = self.available_layers()
        if not layers:
            raise PipelineError("params.yaml", "layers", f"no layers asked for; {self.params.kind} has {available}")
        unknown = [layer for layer in layers if layer not in available]
        if unknown:
            raise PipelineError("params.yaml", "layers", f"unknown layer {unknown[0]!r} for {self.params.kind}; available: {available}")

    def model_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def condition(self, category: str):
        if category not in self.conditions:
            raise PipelineError("params.yaml", "prompt", f"no prompt was encoded for category {category!r}")
        return self.conditions[category]

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor, t: int, category: str) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def layer_attrs(self, layer: str) -> dict:
        return {"module": layer}


def flow_noised(x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """Rectified-flow noising: x = (1 - s) x0 + s eps with s = t / 1000."""
    s = t / 1000.0
    return (1.0 - s) * x0 + s * eps


def linear_on(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` with the weights brought to x's device: under `offload: blocks` a block that has not
    run (or has run and gone back) keeps its weights in host memory."""
    bias = None if linear.bias is None else linear.bias.to(x.device, x.dtype)
    return torch.nn.functional.linear(x, linear.weight.to(x.device, x.dtype), bias)


def adaln_modulation(norm: torch.nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of an AdaLN norm's `linear(silu(temb))`, which diffusers chunks as
    (shift_msa, scale_msa, ...) in AdaLayerNormZero (6 chunks) and AdaLayerNormZeroSingle (3)."""
    linear = norm.linear
    chunks = linear_on(linear, torch.nn.functional.silu(temb)).chunk(linear.out_features // temb.shape[1], dim=1)
    return chunks[0], chunks[1]


