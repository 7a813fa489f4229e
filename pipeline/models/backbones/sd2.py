"""Stable Diffusion 2.1 U-Net, DIFT preset: DDPM noise at integer t, prompt-conditioned U-Net,
features are block outputs such as `up_blocks.1` (1280 channels at 1/16 of the canvas).

Components loaded: `tokenizer` and `text_encoder` (prompts, then freed), `unet`, `scheduler`.
"""

from __future__ import annotations

import torch

from pipeline.models.backbones.base import Backbone, capture, until_captured


class SD2(Backbone):
    kinds = ("sd2",)

    def encode_prompts(self, prompts):
        from diffusers import StableDiffusionPipeline  # its import prints transformers' warnings

        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=self.parts.component("text_encoder"), tokenizer=self.parts.component("tokenizer"),
            unet=None, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return {category: pipe.encode_prompt(prompt, self.device, 1, False)[0] for category, prompt in prompts.items()}

    def load_model(self):
        self.scheduler = self.parts.component("scheduler")
        self.unet = self.parts.load(self.parts.component_class("unet"), "unet", denoiser=True)

    def denoiser(self):
        return self.unet

    def model_config(self):
        return dict(self.unet.config)

    def available_layers(self) -> list[str]:
        unet = self.unet
        return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])

    def noised(self, x0, eps, t):
        return self.scheduler.add_noise(x0, eps, torch.full((x0.shape[0],), t, dtype=torch.long))

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
