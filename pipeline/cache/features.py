"""One image's stored arrays: the seeded random draws, the ensemble's single forward pass through a
backbone, and the float16 the store keeps. Its code is part of every features store's fingerprint
(pipeline/cache/provenance.py); the extraction loop around it (pipeline/cache/extract.py) is not.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.config import BackboneParams
from pipeline.errors import PipelineError


def generator(seed: int, image: str, timestep: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{image}/{timestep}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def layer_tensors(params: BackboneParams, backbone, image: str, category: str, mean: torch.Tensor,
                  std: torch.Tensor, t: int) -> dict[tuple[str, str], torch.Tensor]:
    """(layer, array) -> that array of one image at timestep t, averaged over the ensemble, on the
    backbone's device: ONE forward pass for every layer. `mean`, `std`: the posterior, (C, H, W)."""
    draws = generator(params.seed, image, t)
    shape = (params.ensemble, *mean.shape)
    posterior_eps = torch.randn(shape, generator=draws)
    noise_eps = torch.randn(shape, generator=draws)
    z = mean + std * posterior_eps if params.latent == "sample" else mean.expand(shape)
    x0 = backbone.model_latent(z)
    x = backbone.noised(x0, noise_eps, t) if params.noise else x0
    outputs = backbone.run(x.to(backbone.device, backbone.dtype), t, category)
    return {(layer, array): value.float().mean(0) for layer, arrays in outputs.items() for array, value in arrays.items()}


FLOAT16_MAX = float(np.finfo(np.float16).max)


def as_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """float16 for the store, and how many finite values lay beyond its range (+-65504): those are
    stored as +-65504, never as inf. Massive activations of diffusion transformers computed in bfloat16
    or float32 can reach that far."""
    overflow = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), overflow


def image_maps(params, backbone, image: str, category: str, mean, std, out) -> dict:
    """Every requested array of one image, per timestep, as float16; plus per layer the count of values
    clipped to float16's range ("overflow")."""
    maps: dict[tuple[str, str], list] = {}
    for t in params.timesteps:
        overflow: dict[str, int] = {}
        for (layer, array), value in layer_tensors(params, backbone, image, category, mean, std, t).items():
            values = value.cpu().numpy()
            if not np.isfinite(values).all():
                raise PipelineError(out, f"{layer}/{array}", f"non-finite values for image {image!r} at t={t} "
                                    "(NaN or inf from the model)")
            stored, clipped = as_float16(values)
            overflow[layer] = overflow.get(layer, 0) + clipped
            maps.setdefault((layer, array), []).append(stored)
        for layer, count in overflow.items():
            maps.setdefault((layer, "overflow"), []).append(np.int64(count))
    return {key: np.stack(values) for key, values in maps.items()}
