"""Every backbone kind and what the code that validates, plans and extracts asks about it: the one list
of kinds (params.yaml `backbones.<name>.kind`).

Declarations only, without torch: params validation (pipeline/config.py) reads them, and so does each
family's class (pipeline/models/backbones/), which names the kinds it implements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VAE_FACTOR = 8  # every VAE here (SD2, SD3, FLUX) downsamples by 8
OFFLOAD = ("none", "blocks")  # the denoiser on the device whole, or its blocks streamed from host memory


@dataclass(frozen=True)
class Kind:
    """One backbone kind.

    `reads`: `latents` (an `encoders` store: a VAE's posterior) or `pixels` (a `canvases` store: the canvas
    itself). `config`: the file, inside the model's folder, whose values set the canvas multiple. `offload`:
    the `offload` choices it supports (blocks: only with a denoiser to stream). `components`: what it loads
    from its pipeline folder (T5 aside: `t5`).
    """

    name: str
    reads: str
    config: str | None
    offload: tuple[str, ...]
    components: tuple[str, ...] = ()

    @property
    def reads_pixels(self) -> bool:
        return self.reads == "pixels"

    @property
    def text_encoders(self) -> list[str]:
        return [name for name in self.components if name.startswith("text_encoder")]

    def multiple_for(self, config: dict | None, resizing_grids: bool = False) -> tuple[int, str]:
        """(the canvas side must be a multiple of this, why), from the values of `config` (None: not known
        yet, the least any model of the kind needs). `resizing_grids`: a U-Net may meet a latent grid it cannot
        halve evenly (DIFT's 480-px DAVIS frames: 60 -> 30 -> 15 -> 8 cells), as diffusers' U-Net then resizes
        its up-sampled grids to the skip connections' (its `upsample_size`)."""
        config = config or {}
        if self.name == "sd2" and resizing_grids:
            return VAE_FACTOR, f"the VAE's {VAE_FACTOR} px; the U-Net resizes its odd grids on the way up"
        if self.reads_pixels:
            patch = config.get("patch_size") or config.get("vision_config", {}).get("patch_size") or 14
            return int(patch), "its patch"
        if self.name == "sd2" and "block_out_channels" in config:
            halvings = len(config["block_out_channels"]) - 1  # the U-Net halves the latent once per down block but the last
            return VAE_FACTOR * 2 ** halvings, f"the VAE's {VAE_FACTOR} px x the U-Net's {halvings} halvings"
        if self.name == "sd3":
            patch = int(config.get("patch_size", 2))
            return VAE_FACTOR * patch, f"the VAE's {VAE_FACTOR} px x the transformer's {patch} x {patch} patches"
        if self.name == "flux":  # the pipeline packs latents 2 x 2 (its config's patch_size, 1, is per packed token)
            return VAE_FACTOR * 2, f"the VAE's {VAE_FACTOR} px x FLUX's 2 x 2 latent packing"
        return VAE_FACTOR, f"the VAE's {VAE_FACTOR} px"

    def canvas_multiple(self, model: str | Path, resizing_grids: bool = False) -> tuple[int, str]:
        """`multiple_for` the model's config file where the model's folder is on disk."""
        path = Path(model) / self.config if self.config else None
        if path is None or not path.is_file():
            return self.multiple_for(None, resizing_grids)
        multiple, why = self.multiple_for(json.loads(path.read_text()), resizing_grids)
        return multiple, f"{why}, {path}"


KINDS = {kind.name: kind for kind in (
    Kind("sd2", "latents", "unet/config.json", OFFLOAD, ("text_encoder", "tokenizer", "unet", "scheduler")),
    Kind("sd3", "latents", "transformer/config.json", OFFLOAD,
         ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")),
    Kind("flux", "latents", "transformer/config.json", OFFLOAD,
         ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")),
    Kind("vae-sd2", "latents", None, ("none",)),
    Kind("vae-sd3", "latents", None, ("none",)),
    Kind("dinov2", "pixels", "config.json", ("none",)),
    Kind("clip", "pixels", "config.json", ("none",)),
)}
