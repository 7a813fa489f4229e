"""VAE-only features: the posterior latent itself, in the diffusion model's input space
(SD2: z x scaling_factor, 4 channels; SD3: (z - shift_factor) x scaling_factor, 16 channels), at 1/8."""

from __future__ import annotations

import torch

from pipeline.models.backbones.base import Backbone, flow_noised
from pipeline.errors import PipelineError


class VAELatent(Backbone):
    kinds = ("vae-sd2", "vae-sd3")

    def __init__(self, params, latents_attrs, parts, categories=()):
        if latents_attrs.get("model") != params.model:
            raise PipelineError("params.yaml", "model", f"{params.kind} names {params.model!r} but its latents were "
                                f"encoded with {latents_attrs.get('model')!r}")
        super().__init__(params, latents_attrs, parts, categories)

    def load_model(self):
        # SD2's latents are noised with its DDIM schedule; SD3's with rectified flow (no scheduler).
        self.scheduler = self.parts.component("scheduler") if self.params.kind == "vae-sd2" and self.params.noise else None

    def available_layers(self):
        return ["latent"]

    def noised(self, x0, eps, t):
        if self.scheduler is None:
            return flow_noised(x0, eps, t)
        return self.scheduler.add_noise(x0, eps, torch.full((x0.shape[0],), t, dtype=torch.long))

    def run(self, x, t, category):
        return {"latent": {"features": x.permute(0, 2, 3, 1)}}

    def layer_attrs(self, layer):
        return {"module": "latent", "output": "VAE posterior latent in the model's input space"}
