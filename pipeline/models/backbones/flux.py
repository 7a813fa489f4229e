"""FLUX.1 (double- then single-stream DiT): rectified-flow noising, features are the image-token
INPUTS of `transformer_blocks.k` (double stream) and `single_transformer_blocks.k` (single stream),
laid back on the (H/16, W/16) grid, plus the AdaLN modulation that block applies to that input.

Why inputs: DiT fixes (DiTF) take the input of a block (for FLUX, single block 9), zero its massive
channels, LayerNorm it without affine and re-apply that block's own modulation
`(1 + scale_msa) * LayerNorm(x) + shift_msa`. The input of block k is the output of block k - 1,
so nothing is lost; the first double block's input is the embedded latent (`x_embedder`), and the
input of `single_transformer_blocks.0` is the last double block's image output.

What the modules see (diffusers 0.42): both kinds of blocks are called with keyword arguments
`hidden_states` (image tokens), `encoder_hidden_states` (text tokens), `temb`, `image_rotary_emb`
and return `(encoder_hidden_states, hidden_states)`; a single block concatenates [text, image]
inside itself. A forward pre-hook reads `hidden_states` and keeps its LAST n_image tokens (the
image stream whether or not text tokens were concatenated in front, as older diffusers did), plus
`temb`, from which the block's own norm gives the modulation: `norm1` (AdaLayerNormZero,
`linear(silu(temb)).chunk(6)` -> shift_msa, scale_msa, ...) for a double block, `norm`
(AdaLayerNormZeroSingle, `.chunk(3)` -> shift_msa, scale_msa, gate) for a single block.

Latents: (z - shift_factor) x scaling_factor as 16 x H/8 x W/8, packed by the pipeline's own
`_pack_latents` into 2x2 patches -> (H/16 * W/16, 64) tokens, row-major over the grid, with
`_prepare_latent_image_ids` positions (row, column) and the prompt's `text_ids` (zeros).

Timesteps: params' t in 0..1000; x = (1 - s) x0 + s eps with s = t / 1000, and the transformer gets
`timestep = s`, which FluxTransformer2DModel multiplies by 1000 itself (exactly what FluxPipeline
passes: `timestep / 1000`). Guidance-distilled models (`guidance_embeds`, FLUX.1-dev) also get
`guidance = GUIDANCE` (the pipeline's default guidance_scale, 3.5; the transformer multiplies it by
1000 too); schnell-like models (no guidance embedder) get none. Text: CLIP-L pooled output and T5
at MAX_SEQUENCE_LENGTH tokens, both always loaded (the `t5` parameter is for sd3 only).
"""

from __future__ import annotations

import torch

from pipeline.models.backbones.base import Backbone, adaln_modulation, capture, flow_noised, until_captured

# FluxPipeline's default guidance_scale (FLUX.1-dev); fed to guidance-distilled transformers.
GUIDANCE = 3.5
# FluxPipeline's default T5 length (FLUX.1-dev; schnell uses 256). Padding tokens take part in
# attention (FLUX masks nothing), so this changes the features; it is fixed, not a parameter.
MAX_SEQUENCE_LENGTH = 512

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


class Flux(Backbone):
    kinds = ("flux",)

    def encode_prompts(self, prompts):
        from diffusers import FluxPipeline  # its import prints transformers' warnings

        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                            **{name: self.parts.component(name) for name in names})
        return {category: pipe.encode_prompt(prompt, prompt_2=None, device=self.device,
                                             max_sequence_length=MAX_SEQUENCE_LENGTH)
                for category, prompt in prompts.items()}

    def load_model(self):
        self.transformer = self.parts.load(self.parts.component_class("transformer"), "transformer", denoiser=True)
        self.guidance = GUIDANCE if self.transformer.config.guidance_embeds else None

    def denoiser(self):
        return self.transformer

    def model_config(self):
        return dict(self.transformer.config)

    def available_layers(self):
        return ([f"{DOUBLE}.{i}" for i in range(len(self.transformer.transformer_blocks))]
                + [f"{SINGLE}.{i}" for i in range(len(self.transformer.single_transformer_blocks))])

    def noised(self, x0, eps, t):
        return flow_noised(x0, eps, t)

    def run(self, x, t, category):
        from diffusers import FluxPipeline  # its import prints transformers' warnings

        embeds, pooled, text_ids = self.condition(category)
        batch, channels, h, w = x.shape
        grid = (h // 2, w // 2)
        tokens = FluxPipeline._pack_latents(x, batch, channels, h, w)  # (E, h/2 * w/2, 4 * channels)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, *grid, self.device, x.dtype)
        n_image = grid[0] * grid[1]

        def pick(name, block, kwargs):
            image = kwargs["hidden_states"][:, -n_image:]  # image stream only
            shift, scale = adaln_modulation(block.norm1 if hasattr(block, "norm1") else block.norm, kwargs["temb"])
            return {"features": image.reshape(batch, *grid, -1), "shift": shift, "scale": scale}

        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=self.device)
        with torch.no_grad(), capture(self.transformer, self.params.layers, pick, inputs=True) as captured:
            until_captured(lambda: self.transformer(
                hidden_states=tokens, timestep=torch.full((batch,), t / 1000.0, device=self.device),
                guidance=guidance, encoder_hidden_states=embeds.expand(batch, -1, -1),
                pooled_projections=pooled.expand(batch, -1), txt_ids=text_ids, img_ids=img_ids,
                return_dict=False,
            ))
        return {layer: captured[layer] for layer in self.params.layers}

    def layer_attrs(self, layer):
        norm = "norm1" if layer.startswith(f"{DOUBLE}.") else "norm"
        return {
            "module": layer, "output": f"transformer.{layer} input, image stream (hidden_states)",
            "modulation": f"transformer.{layer}.{norm} (shift_msa, scale_msa)",
            "guidance": self.guidance,
        }
