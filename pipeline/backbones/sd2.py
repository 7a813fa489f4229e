"""Stable Diffusion 2.1 U-Net, DIFT preset: DDPM noise at integer t, prompt-conditioned U-Net,
features are block outputs such as `up_blocks.1` (1280 channels at 1/16 of the canvas)."""

from __future__ import annotations

import torch

from pipeline import hub
from pipeline.backbones import Backbone, capture, until_captured


class SD2(Backbone):
    def __init__(self, params, latents_attrs, device, dtype):
        super().__init__(params, latents_attrs, device, dtype)
        hub.quiet()
        from diffusers import StableDiffusionPipeline

        self.pipe = hub.from_pretrained(
            StableDiffusionPipeline, params.model, dtype=dtype, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.vae = None  # the latents store already holds the VAE's work
        self.pipe.to(device)
        self.unet = self.pipe.unet.eval()

    def available_layers(self) -> list[str]:
        unet = self.unet
        return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])

    def encode_prompt(self, prompt: str):
        embeds, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
        return embeds

    def noised(self, x0, eps, t):
        return self.pipe.scheduler.add_noise(x0, eps, torch.full((x0.shape[0],), t, dtype=torch.long))

    def run(self, x, t, category):
        embeds = self.condition(category).expand(x.shape[0], -1, -1)
        # Down blocks return (hidden states, skip connections); the feature map is the first.
        pick = lambda name, out: (out[0] if isinstance(out, tuple) else out).permute(0, 2, 3, 1)  # noqa: E731
        with torch.no_grad(), capture(self.unet, self.params.layers, pick) as captured:
            timestep = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
            until_captured(lambda: self.unet(x, timestep, encoder_hidden_states=embeds))
        return {layer: {"features": captured[layer]} for layer in self.params.layers}

    def layer_attrs(self, layer):
        return {"module": layer, "output": f"unet.{layer} output (hidden states)"}
