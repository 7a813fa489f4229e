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

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pipeline import hub
from pipeline.backbones import Backbone, StopForward, flow_noised, until_captured

# FluxPipeline's default guidance_scale (FLUX.1-dev); fed to guidance-distilled transformers.
GUIDANCE = 3.5
# FluxPipeline's default T5 length (FLUX.1-dev; schnell uses 256). Padding tokens take part in
# attention (FLUX masks nothing), so this changes the features; it is fixed, not a parameter.
MAX_SEQUENCE_LENGTH = 512

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


@contextmanager
def capture_inputs(model: torch.nn.Module, names: list[str], pick):
    """Forward PRE-hooks on the modules `names`; fills a dict name -> pick(name, module, kwargs)
    with what each module receives (called with keyword arguments, as FLUX's blocks are).

    Once every name has fired, the hook raises StopForward before the last module runs; run the
    model inside `until_captured`.
    """
    modules = dict(model.named_modules())
    captured: dict[str, object] = {}

    def hook_for(name):
        def hook(module, args, kwargs):
            captured[name] = pick(name, module, kwargs)
            if len(captured) == len(names):
                raise StopForward

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name), with_kwargs=True) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def modulation(block: torch.nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift_msa, scale_msa) of the block's own AdaLN on its input: `norm1` for a double block
    (AdaLayerNormZero, 6 chunks), `norm` for a single block (AdaLayerNormZeroSingle, 3 chunks)."""
    linear = (block.norm1 if hasattr(block, "norm1") else block.norm).linear
    chunks = linear(F.silu(temb)).chunk(linear.out_features // temb.shape[1], dim=1)
    return chunks[0], chunks[1]


class Flux(Backbone):
    def __init__(self, params, latents_attrs, device, dtype):
        super().__init__(params, latents_attrs, device, dtype)
        hub.quiet()
        from diffusers import FluxPipeline

        self.pipe = hub.from_pretrained(FluxPipeline, params.model, dtype=dtype)
        self.pipe.vae = None  # the latents store already holds the VAE's work
        self.pipe.to(device)
        self.transformer = self.pipe.transformer.eval()
        self.guidance = GUIDANCE if self.transformer.config.guidance_embeds else None

    def available_layers(self):
        return ([f"{DOUBLE}.{i}" for i in range(len(self.transformer.transformer_blocks))]
                + [f"{SINGLE}.{i}" for i in range(len(self.transformer.single_transformer_blocks))])

    def encode_prompt(self, prompt):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt, prompt_2=None, device=self.device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return embeds, pooled, text_ids

    def noised(self, x0, eps, t):
        return flow_noised(x0, eps, t)

    def run(self, x, t, category):
        embeds, pooled, text_ids = self.condition(category)
        batch, channels, h, w = x.shape
        grid = (h // 2, w // 2)
        tokens = self.pipe._pack_latents(x, batch, channels, h, w)  # (E, h/2 * w/2, 4 * channels)
        img_ids = self.pipe._prepare_latent_image_ids(batch, *grid, self.device, x.dtype)
        n_image = grid[0] * grid[1]

        def pick(name, block, kwargs):
            image = kwargs["hidden_states"][:, -n_image:]  # image stream only
            shift, scale = modulation(block, kwargs["temb"])
            return {"features": image.reshape(batch, *grid, -1), "shift": shift, "scale": scale}

        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=self.device)
        with torch.no_grad(), capture_inputs(self.transformer, self.params.layers, pick) as captured:
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
