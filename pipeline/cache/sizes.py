"""What a store will hold before a byte is written: every stored array's shape from a run of the backbone
on the meta device (no weights, no memory, the same capture path as extraction), the bytes per image,
and whether the store's disk has room for the images still to do (encode and extract check before they
start; `python cli.py plan` adds downloads, memory and time on top, pipeline/workflows/plan.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel, Dinov2Model

from pipeline.cache.codecs import chunk_bytes
from pipeline.cache.features import layer_tensors
from pipeline.config import BackboneParams, EncoderParams
from pipeline.errors import PipelineError
from pipeline.models import hub
from pipeline.models.backbones.registry import make_backbone
from pipeline.models.kinds import KINDS, VAE_FACTOR
from pipeline.models.realsize import ConfigParts

ACTIVATION_FACTOR = 3


# ---- the meta-device run ------------------------------------------------------------------------

@dataclasses.dataclass
class MetaRun:
    shapes: dict[tuple[str, str], tuple[int, ...]]  # (layer, array) -> shape of one image at one timestep
    flops: int  # one forward pass of one ensemble member
    largest_activation: int  # bytes of the largest tensor an op produced, one ensemble member
    text_parameters: int
    denoiser_parameters: int
    resident_parameters: int  # on the device under `offload: blocks`: the largest block and what is in no block


def meta_run(backbone: BackboneParams, latents_attrs: dict, configs: Path) -> MetaRun:
    """Build `backbone` from `configs` on the meta device and run one image, one member, one timestep."""
    one = dataclasses.replace(backbone, ensemble=1, timesteps=backbone.timesteps[:1])
    parts = ConfigParts(configs, dtype=torch_dtype(backbone.dtype, "backbones"))
    model = make_backbone(one, {**latents_attrs, "model": backbone.model}, parts, ["plan"])
    model.check_layers(backbone.layers)
    width, height = latents_attrs.get("canvas_size") or (latents_attrs["canvas"],) * 2  # (W, H); square but DAVIS's
    factor = VAE_FACTOR if latents_attrs.get("encoder", "vae") == "vae" else 1
    latent = torch.zeros(latents_attrs["latent_channels"], height // factor, width // factor)
    with FlopCounterMode(display=False) as flops, LargestOutput() as largest:
        tensors = layer_tensors(one, model, "plan/x", "plan", latent, latent, one.timesteps[0])
    denoiser = model.denoiser()
    blocks = [block for module in (denoiser.children() if denoiser is not None else [])
              if isinstance(module, torch.nn.ModuleList) for block in module]
    block_sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    total = sum(p.numel() for p in denoiser.parameters()) if denoiser is not None else 0
    return MetaRun(
        shapes={key: tuple(value.shape) for key, value in tensors.items()}, flops=int(flops.get_total_flops()),
        largest_activation=largest.bytes, text_parameters=sum(parameters(parts, c) for c in text_components(backbone)),
        denoiser_parameters=total, resident_parameters=total - sum(block_sizes) + max(block_sizes, default=0),
    )


class LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the largest tensor any op produces, attention's internals left out: on CUDA
    scaled_dot_product_attention runs fused kernels that never hold the score matrix."""

    def __init__(self):
        super().__init__()
        self.bytes, self._in_attention = 0, 0

    def __enter__(self):
        self._sdpa = F.scaled_dot_product_attention

        def fused(*args, **kwargs):
            self._in_attention += 1
            try:
                out = self._sdpa(*args, **kwargs)
            finally:
                self._in_attention -= 1
            self._record(out)
            return out

        F.scaled_dot_product_attention = fused
        return super().__enter__()

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._sdpa
        return super().__exit__(*exc)

    def _record(self, out):
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._in_attention:
            self._record(out)
        return out


def torch_dtype(name: str, section: str) -> torch.dtype:
    if name not in hub.DTYPES:
        raise PipelineError("params.yaml", f"{section}: dtype", f"unknown dtype {name!r}; expected one of {sorted(hub.DTYPES)}")
    return hub.DTYPES[name]


def stored_bytes(run: MetaRun, timesteps: int, storage: str = "float16") -> int:
    """Bytes of one image in a features store before compression: `features` kept as `storage`
    (pipeline/cache/codecs.py), the other arrays float16, plus an int64 overflow count per layer."""
    arrays = sum(chunk_bytes(storage if array == "features" else "float16", shape) for (_, array), shape in run.shapes.items())
    layers = len({layer for layer, _ in run.shapes})
    return timesteps * (arrays + 8 * layers)


def check_store_fits(out: str | Path, backbone: BackboneParams, latents_attrs: dict, pending: int) -> None:
    """`check_disk` for a features store, from the model folder's config files; skipped, with a note, for a
    model without a local folder (a hub id: its configs would need the network)."""
    configs = Path(backbone.model)
    if not ((configs / "model_index.json").exists() or (configs / "config.json").exists()):
        print(f"{out}: disk space not checked (no local config files for {backbone.model!r})", file=sys.stderr)
        return
    run = meta_run(backbone, latents_attrs, configs)
    check_disk(out, pending * stored_bytes(run, len(backbone.timesteps), backbone.storage), pending)


def latents_bytes_per_image(encoder: EncoderParams, channels: int, canvas_size: tuple[int, int] | None = None) -> int:
    """`canvas_size`: (W, H) of a rectangular canvas; default canvas x canvas."""
    width, height = canvas_size or (encoder.canvas, encoder.canvas)
    if encoder.kind == "pixels":
        return 2 * width * height * channels  # the canvas and its std (0), uint8 (codecs.UINT8_LOSSLESS)
    return 2 * (width // VAE_FACTOR) * (height // VAE_FACTOR) * channels * 4  # mean and std, float32


# ---- disk ---------------------------------------------------------------------------------------

def disk_free(path: str | Path) -> int:
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(out: str | Path, needed: int, images: int) -> None:
    """Refuse to start a store that cannot fit (`check_disk: false` in params.yaml overrides)."""
    free = disk_free(out)
    if needed > free:
        raise PipelineError(out, "disk", f"{images} images need {human(needed)} (uncompressed) but {human(free)} "
                                         "are free there; free space, point `store:` elsewhere, or set "
                                         "`check_disk: false` to start anyway")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def text_components(backbone: BackboneParams) -> list[str]:
    return KINDS[backbone.kind].text_encoders + (["text_encoder_3"] if backbone.kind == "sd3" and backbone.t5 else [])


def parameters(parts, component: str | None) -> int:
    """Parameters of one component built on the meta device (0 for tokenizers and schedulers)."""
    if component is None:  # a single transformers model: DINOv2, or CLIP (the repository holds text and vision)
        cls = Dinov2Model if parts.config().get("model_type") == "dinov2" else CLIPModel
    else:
        cls = parts.component_class(component)
    if not issubclass(cls, torch.nn.Module):
        return 0
    return sum(p.numel() for p in parts.load(cls, component).parameters())
