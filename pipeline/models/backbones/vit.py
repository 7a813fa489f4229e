"""Vision-transformer baselines from DIFT's table: DINOv2 (`Dinov2Model`) and CLIP / OpenCLIP vision
towers (`CLIPVisionModel`), from transformers. They read the canvas from a `kind: pixels` encoder
store; features are the patch tokens of a block's output (CLS and register tokens dropped), laid back
on the (canvas / patch)^2 grid, row-major. No noise and no timestep: the store's timestep is a label.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel, Dinov2Model

from pipeline.models.backbones.base import Backbone, capture, until_captured
from pipeline.errors import PipelineError

# The official preprocessing constants of each family (ImageNet for DINOv2, OpenAI CLIP's for CLIP).
NORMALISATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class ViT(Backbone):
    kinds = ("dinov2", "clip")

    def __init__(self, params, latents_attrs, parts, categories=()):
        if params.noise:
            raise PipelineError("params.yaml", "noise", f"{params.kind} takes clean images; set noise: false")
        super().__init__(params, latents_attrs, parts, categories)
        mean, std = NORMALISATION[params.kind]
        self.mean = torch.tensor(mean, device=self.device, dtype=self.dtype)[:, None, None]
        self.std = torch.tensor(std, device=self.device, dtype=self.dtype)[:, None, None]
        self.prefix = "encoder.layer" if params.kind == "dinov2" else "encoder.layers"

    def load_model(self):
        self.model = self.parts.load(Dinov2Model if self.params.kind == "dinov2" else CLIPVisionModel)
        self.patch = self.model.config.patch_size

    def denoiser(self):
        return self.model

    def model_config(self):
        return self.model.config.to_dict()

    def available_layers(self):
        count = self.model.config.num_hidden_layers
        return [f"{self.prefix}.{i}" for i in range(count)]

    def noised(self, x0, eps, t):
        return x0

    def run(self, x, t, category):
        batch, _, h, w = x.shape
        grid = (h // self.patch, w // self.patch)
        pixels = ((x + 1) / 2 - self.mean) / self.std  # the canvas is stored in [-1, 1]
        # Keep the last grid-many tokens: the patch tokens (CLS and any registers come first).
        pick = lambda name, out: (out[0] if isinstance(out, tuple) else out)[:, -grid[0] * grid[1]:].reshape(batch, *grid, -1)  # noqa: E731
        with torch.no_grad(), capture(self.model, self.params.layers, pick) as captured:
            until_captured(lambda: self.model(pixel_values=pixels, interpolate_pos_encoding=True))
        return {layer: {"features": captured[layer]} for layer in self.params.layers}

    def layer_attrs(self, layer):
        return {"module": layer, "output": f"{layer} output, patch tokens (CLS and registers dropped)"}
