"""Backbones by `kind`: what turns a model-space latent into per-layer feature maps.

One file per model family (`sd2.py`, `sd3.py`, `vae.py`); this module holds the registry, the
parameters every backbone shares, and the forward-hook capture they all use.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.config import BackboneParams
from pipeline.errors import PipelineError


class StopForward(Exception):
    """Raised by the last capture hook: nothing after the deepest requested layer runs."""


@contextmanager
def capture(model: torch.nn.Module, names: list[str], pick):
    """Forward hooks on the modules `names`; fills a dict name -> pick(name, output).

    Once every name has fired, the hook raises StopForward; run the model inside `until_captured`.
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            captured[name] = pick(name, output)
            if len(captured) == len(names):
                raise StopForward

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
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
    adds noise at timestep t, `run` returns {layer: {"features": (E, Y, X, C), ...}}."""

    def __init__(self, params: BackboneParams, latents_attrs: dict, device: torch.device, dtype: torch.dtype):
        self.params, self.device, self.dtype = params, device, dtype
        self.scaling_factor = float(latents_attrs["scaling_factor"])
        self.shift_factor = float(latents_attrs.get("shift_factor") or 0.0)
        self._conditions: dict[str, tuple] = {}

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
        """Prompt embeddings, computed once per category."""
        if category not in self._conditions:
            with torch.no_grad():
                self._conditions[category] = self.encode_prompt(self.params.prompt.format(category=category))
        return self._conditions[category]

    def encode_prompt(self, prompt: str):
        raise NotImplementedError

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


def make_backbone(params: BackboneParams, latents_attrs: dict, device, dtype) -> Backbone:
    from pipeline.backbones import flux, sd2, sd3, vae, vit

    kinds = {"sd2": sd2.SD2, "sd3": sd3.SD3, "flux": flux.Flux, "vae-sd2": vae.VAELatent, "vae-sd3": vae.VAELatent,
             "dinov2": vit.ViT, "clip": vit.ViT}
    if params.kind not in kinds:
        raise PipelineError("params.yaml", "kind", f"unknown backbone kind {params.kind!r}; expected one of {sorted(kinds)}")
    reads_pixels = params.kind in ("dinov2", "clip")
    if reads_pixels != (latents_attrs.get("encoder", "vae") == "pixels"):
        needed = "kind: pixels" if reads_pixels else "kind: vae"
        raise PipelineError("params.yaml", "latents", f"{params.kind} needs an encoder with `{needed}`; "
                            f"{params.latents!r} is a {latents_attrs.get('encoder', 'vae')} encoder")
    return kinds[params.kind](params, latents_attrs, device, dtype)
