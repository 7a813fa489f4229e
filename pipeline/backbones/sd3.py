"""Stable Diffusion 3 MMDiT: rectified-flow noising, features are the image-token outputs of
`transformer_blocks.k` laid back on the (H/16, W/16) grid, plus the AdaLN modulation that the model
applies to that tensor next.

`transformer_blocks[k]` returns `(encoder_hidden_states, hidden_states)`; image tokens are row-major
over the patch grid. Its output is the input of block k + 1, whose `norm1` modulates it as
`(1 + scale_msa) * LayerNorm(x) + shift_msa`; for the last block, `norm_out` does
`(1 + scale) * LayerNorm(x) + shift`. Storing that (shift, scale) lets DiT fixes (LayerNorm,
re-modulate, drop massive channels) run at match time, from cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import hub
from pipeline.backbones import Backbone, capture, flow_noised, until_captured


class SD3(Backbone):
    def __init__(self, params, latents_attrs, device, dtype):
        super().__init__(params, latents_attrs, device, dtype)
        hub.quiet()
        from diffusers import StableDiffusion3Pipeline

        no_t5 = {} if params.t5 else {"text_encoder_3": None, "tokenizer_3": None}
        self.pipe = hub.from_pretrained(StableDiffusion3Pipeline, params.model, dtype=dtype, **no_t5)
        self.pipe.vae = None  # the latents store already holds the VAE's work
        self.pipe.to(device)
        self.transformer = self.pipe.transformer.eval()
        self.patch = self.transformer.config.patch_size

    def available_layers(self):
        return [f"transformer_blocks.{i}" for i in range(len(self.transformer.transformer_blocks))]

    def encode_prompt(self, prompt):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def noised(self, x0, eps, t):
        return flow_noised(x0, eps, t)

    def modulation(self, layer: str, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) that the model applies to the output of `layer` next."""
        blocks = self.transformer.transformer_blocks
        k = int(layer.rsplit(".", 1)[1])
        emb = F.silu(temb)
        if k + 1 < len(blocks):
            linear = blocks[k + 1].norm1.linear
            chunks = linear(emb).chunk(linear.out_features // temb.shape[1], dim=1)
            return chunks[0], chunks[1]  # shift_msa, scale_msa
        scale, shift = self.transformer.norm_out.linear(emb).chunk(2, dim=1)
        return shift, scale

    def run(self, x, t, category):
        embeds, pooled = self.condition(category)
        batch, _, h, w = x.shape
        grid = (h // self.patch, w // self.patch)
        pick = lambda name, out: out[1].reshape(batch, *grid, -1)  # noqa: E731
        temb: list[torch.Tensor] = []
        hook = self.transformer.time_text_embed.register_forward_hook(lambda m, a, out: temb.append(out))
        try:
            with torch.no_grad(), capture(self.transformer, self.params.layers, pick) as captured:
                until_captured(lambda: self.transformer(
                    hidden_states=x, timestep=torch.full((batch,), float(t), device=self.device),
                    encoder_hidden_states=embeds.expand(batch, -1, -1),
                    pooled_projections=pooled.expand(batch, -1), return_dict=False,
                ))
                result = {}
                for layer in self.params.layers:
                    shift, scale = self.modulation(layer, temb[0])
                    result[layer] = {"features": captured[layer], "shift": shift, "scale": scale}
        finally:
            hook.remove()
        return result

    def layer_attrs(self, layer):
        k = int(layer.rsplit(".", 1)[1])
        last = k + 1 == len(self.transformer.transformer_blocks)
        return {
            "module": layer, "output": f"transformer.{layer} output, image stream (hidden_states)",
            "modulation": "transformer.norm_out (shift, scale)" if last
            else f"transformer.transformer_blocks.{k + 1}.norm1 (shift_msa, scale_msa)",
        }
