"""Backbones by `kind`: what turns a model-space latent into per-layer feature maps.

One file per model family (`sd2.py`, `sd3.py`, `flux.py`, `vae.py`, `vit.py`); this module holds the
registry, what every backbone shares, the forward-hook capture they all use, and `Parts`: where a
backbone's components come from.

A backbone is built in two phases, so that the text encoders and the denoiser never share the device:
every category's prompt is encoded first (text encoders loaded, used once per category, freed), then
the denoiser is loaded. That is what diffusers' model CPU offload achieves, without hooks; `offload:
blocks` additionally streams the denoiser's blocks from host memory (diffusers group offloading), for
a denoiser larger than the card.
"""

from __future__ import annotations

import gc
import json
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.models import hub
from pipeline.config import BackboneParams
from pipeline.errors import PipelineError

OFFLOAD = ("none", "blocks")


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


class Parts:
    """Where a backbone's components come from: `from_pretrained` of a hub id or pipeline folder, one
    component at a time (`unet`, `text_encoder_2`...), each only when asked for. Its class is the one
    the folder's `model_index.json` names, so a component is loaded exactly as its pipeline would."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 revision: str | None = None):
        if offload not in OFFLOAD:
            raise PipelineError("params.yaml", "offload", f"expected one of {list(OFFLOAD)}, got {offload!r}")
        self.model, self.device, self.dtype, self.offload, self.revision = model, device, dtype, offload, revision
        self._index: dict | None = None

    def index(self) -> dict:
        """The pipeline's model_index.json: component name -> [library, class]."""
        if self._index is None:
            self._index = hub.load_config(self.model, "model_index.json", revision=self.revision)
        return self._index

    def component_class(self, name: str):
        import importlib

        entry = self.index().get(name)
        if not isinstance(entry, list) or entry[0] is None:
            raise PipelineError(self.model, name, "the pipeline has no such component (model_index.json)")
        return getattr(importlib.import_module(entry[0]), entry[1])

    def component(self, name: str):
        """A text-side component (tokenizer, text encoder, scheduler) on the device."""
        return self.load(self.component_class(name), name)

    def load(self, cls, subfolder: str | None = None, denoiser: bool = False):
        kwargs = {} if _is_config_only(cls) else {"dtype": self.dtype}
        loaded = hub.from_pretrained(cls, self.model, subfolder=subfolder, revision=self.revision, **kwargs)
        if not isinstance(loaded, torch.nn.Module):
            return loaded
        loaded.eval().requires_grad_(False)
        if denoiser and self.offload == "blocks":
            # No CUDA streams: their prefetching is switched on by the end of a whole forward pass,
            # and capture stops the pass after the deepest layer.
            loaded.enable_group_offload(onload_device=self.device, offload_device=torch.device("cpu"),
                                        offload_type="block_level", num_blocks_per_group=1)
            return loaded
        try:
            return loaded.to(self.device)
        except torch.OutOfMemoryError:
            raise PipelineError(self.model, subfolder, f"does not fit on {self.device}; set `offload: blocks` "
                                "for this backbone (see `python cli.py plan`)") from None

    def config(self, subfolder: str | None = None) -> dict:
        return hub.load_config(self.model, "config.json", subfolder=subfolder, revision=self.revision)

    def release(self) -> None:
        """Give the memory of components dropped since back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _is_config_only(cls) -> bool:
    """Tokenizers and schedulers take no dtype."""
    return not issubclass(cls, torch.nn.Module)


class ConfigParts(Parts):
    """The same components built from their config files alone (a folder laid out like the hub
    repository, e.g. `pipeline/models/real_configs/sd3-medium`): on the meta device, the real architecture's
    shapes and module paths with no weights and no memory (`plan`, the real-size tests); or on the CPU
    with seeded random weights (pipeline/models/realsize.py). Tokenizers are the project's tiny ones of the same
    family: config files carry no vocabulary, and only the padded length of the token ids matters here."""

    def __init__(self, configs: str | Path, device: str = "meta", dtype: torch.dtype = torch.float16, seed: int = 0):
        super().__init__(str(configs), torch.device(device), dtype)
        self.seed = seed

    def index(self) -> dict:
        if self._index is None:
            path = Path(self.model) / "model_index.json"
            self._index = json.loads(path.read_text()) if path.exists() else {}
        return self._index

    def load(self, cls, subfolder: str | None = None, denoiser: bool = False):
        from pipeline.models import tokenizers

        if cls.__name__.startswith("CLIPTokenizer"):
            return tokenizers.make_tiny_clip_tokenizer()
        if cls.__name__.startswith("T5Tokenizer"):
            return tokenizers.make_tiny_t5_tokenizer()
        config = self.config(subfolder)
        if _is_config_only(cls):
            return cls.from_config(config)
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(self.seed + zlib.crc32((subfolder or "").encode()))  # independent of load order
            if hasattr(cls, "config_class"):  # transformers; a full CLIPConfig narrows to its vision tower
                if config.get("model_type") != cls.config_class.model_type and "vision_config" in config:
                    config = config["vision_config"]
                model = cls(cls.config_class(**config))
            else:  # diffusers
                model = cls.from_config(config)
        return model.to(self.dtype).eval().requires_grad_(False)

    def config(self, subfolder: str | None = None) -> dict:
        folder = Path(self.model) / (subfolder or "")
        for file in ("config.json", "scheduler_config.json"):
            if (folder / file).exists():
                return json.loads((folder / file).read_text())
        raise PipelineError(folder, None, "no config.json")

    def release(self) -> None:
        gc.collect()


class Backbone:
    """A loaded model: `model_latent` maps a posterior sample to the model's input space, `noised`
    adds noise at timestep t, `run` returns {layer: {"features": (E, Y, X, C), ...}}.

    Construction encodes the prompts of `categories` (subclasses: `encode_prompts`), frees the text
    encoders, then loads the denoiser (`load_model`)."""

    def __init__(self, params: BackboneParams, latents_attrs: dict, parts: Parts, categories: list[str] = ()):
        self.params, self.parts, self.device, self.dtype = params, parts, parts.device, parts.dtype
        self.scaling_factor = float(latents_attrs["scaling_factor"])
        self.shift_factor = float(latents_attrs.get("shift_factor") or 0.0)
        self.canvas = int(latents_attrs["canvas"])
        prompts = {category: params.prompt.format(category=category) for category in sorted(set(categories))}
        with torch.no_grad():
            self.conditions = self.encode_prompts(prompts)
        parts.release()
        self.load_model()
        multiple = self.canvas_multiple()
        if self.canvas % multiple:
            raise PipelineError("params.yaml", "canvas", f"{self.canvas} px does not suit {params.kind} "
                                f"({params.model}): the canvas must be a multiple of {multiple} px")

    def encode_prompts(self, prompts: dict[str, str]) -> dict:
        """category -> the model's conditioning; the text encoders are dropped on return."""
        return {}

    def load_model(self) -> None:
        raise NotImplementedError

    def canvas_multiple(self) -> int:
        """The canvas side must be a multiple of this (the VAE's factor times what the model needs)."""
        raise NotImplementedError

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


VAE_FACTOR = 8  # every VAE here (SD2, SD3, FLUX) downsamples by 8


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


KINDS = ("sd2", "sd3", "flux", "vae-sd2", "vae-sd3", "dinov2", "clip")


def backbone_class(kind: str):
    from pipeline.models.backbones import flux, sd2, sd3, vae, vit

    classes = {"sd2": sd2.SD2, "sd3": sd3.SD3, "flux": flux.Flux, "vae-sd2": vae.VAELatent, "vae-sd3": vae.VAELatent,
               "dinov2": vit.ViT, "clip": vit.ViT}
    if kind not in classes:
        raise PipelineError("params.yaml", "kind", f"unknown backbone kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind]


def make_backbone(params: BackboneParams, latents_attrs: dict, parts: Parts, categories: list[str] = ()) -> Backbone:
    cls = backbone_class(params.kind)
    reads_pixels = params.kind in ("dinov2", "clip")
    if reads_pixels != (latents_attrs.get("encoder", "vae") == "pixels"):
        needed = "kind: pixels" if reads_pixels else "kind: vae"
        raise PipelineError("params.yaml", "latents", f"{params.kind} needs an encoder with `{needed}`; "
                            f"{params.latents!r} is a {latents_attrs.get('encoder', 'vae')} encoder")
    return cls(params, latents_attrs, parts, categories)
