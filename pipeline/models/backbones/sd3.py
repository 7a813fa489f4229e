"""Stable Diffusion 3 MMDiT: rectified-flow noising, features are the image-token outputs of
`transformer_blocks.k` laid back on the (H/16, W/16) grid, plus the AdaLN modulation that the model
applies to that tensor next.

`transformer_blocks[k]` returns `(encoder_hidden_states, hidden_states)`; image tokens are row-major
over the patch grid. Its output is the input of block k + 1, whose `norm1` modulates it as
`(1 + scale_msa) * LayerNorm(x) + shift_msa`; for the last block, `norm_out` does
`(1 + scale) * LayerNorm(x) + shift`. Storing that (shift, scale) lets DiT fixes (LayerNorm,
re-modulate, drop massive channels) run at match time, from cache.

Components loaded: CLIP-L and CLIP-G (`text_encoder`, `text_encoder_2` and their tokenizers) and,
with `t5: true`, T5-XXL (`text_encoder_3`), for the prompts, then freed; then `transformer`.
Without T5, diffusers conditions on zeros in T5's place, as wide as the transformer's joint attention.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.models.backbones.base import (Backbone, adaln_modulation, capture, flow_noised, linear_on,
                                        until_captured)


class SD3(Backbone):
    kinds = ("sd3",)

    def encode_prompts(self, prompts):
        from diffusers import StableDiffusion3Pipeline  # its import prints transformers' warnings

        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        names += ["text_encoder_3", "tokenizer_3"] if self.params.t5 else []
        components = {"transformer": None, "scheduler": None, "vae": None, "text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline(**components | {name: self.parts.component(name) for name in names})
        if not self.params.t5:
            # The zeros standing in for T5 are sized from the transformer's config, all diffusers reads of it here.
            config = SimpleNamespace(**self.parts.config("transformer"))
            object.__setattr__(pipe, "transformer", SimpleNamespace(config=config))
        conditions = {}
        for category, prompt in prompts.items():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, device=self.device,
                                                      do_classifier_free_guidance=False)
            conditions[category] = (embeds, pooled)
        return conditions

    def load_model(self):
        self.transformer = self.parts.load(self.parts.component_class("transformer"), "transformer", denoiser=True)
        self.patch = self.transformer.config.patch_size

    def denoiser(self):
        return self.transformer

    def model_config(self):
        return dict(self.transformer.config)

    def available_layers(self):
        return [f"transformer_blocks.{i}" for i in range(len(self.transformer.transformer_blocks))]

    def noised(self, x0, eps, t):
        return flow_noised(x0, eps, t)

    def modulation(self, layer: str, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) that the model applies to the output of `layer` next."""
        blocks = self.transformer.transformer_blocks
        k = int(layer.rsplit(".", 1)[1])
        if k + 1 < len(blocks):
            return adaln_modulation(blocks[k + 1].norm1, temb)  # shift_msa, scale_msa
        scale, shift = linear_on(self.transformer.norm_out.linear, torch.nn.functional.silu(temb)).chunk(2, dim=1)
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
