"""Backbone kind -> the family class that implements it (each class names its `kinds`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.models.backbones.base import Backbone
from pipeline.models.backbones.flux import Flux
from pipeline.models.backbones.parts import Parts
from pipeline.models.backbones.sd2 import SD2
from pipeline.models.backbones.sd3 import SD3
from pipeline.models.backbones.vae import VAELatent
from pipeline.models.backbones.vit import ViT
from pipeline.models.kinds import KINDS

if TYPE_CHECKING:
    from pipeline.config import BackboneParams

FAMILIES = (SD2, SD3, Flux, VAELatent, ViT)
BACKBONES: dict[str, type[Backbone]] = {kind: family for family in FAMILIES for kind in family.kinds}


def backbone_class(kind: str) -> type[Backbone]:
    if kind not in BACKBONES:
        raise PipelineError("params.yaml", "kind", f"unknown backbone kind {kind!r}; expected one of {sorted(KINDS)}")
    return BACKBONES[kind]


def make_backbone(params: BackboneParams, latents_attrs: dict, parts: Parts, categories: list[str] = ()) -> Backbone:
    cls = backbone_class(params.kind)
    check_latents(params, latents_attrs)
    backbone = cls(params, latents_attrs, parts, categories)
    check_canvas(backbone)
    return backbone


# What a kind declares (pipeline/models/kinds.py) checks a run; it shapes no stored value, so the store's code
# identity counts these checks by their own source, not the declarations (pipeline/cache/extract.py, `feature_code`):
# a kind added or edited leaves every other store as it is.

def check_latents(params: BackboneParams, latents_attrs: dict) -> None:
    reads_pixels = KINDS[params.kind].reads_pixels
    if reads_pixels != (latents_attrs.get("encoder", "vae") == "pixels"):
        needed = "kind: pixels" if reads_pixels else "kind: vae"
        raise PipelineError("params.yaml", "latents", f"{params.kind} needs an encoder with `{needed}`; "
                            f"{params.latents!r} is a {latents_attrs.get('encoder', 'vae')} encoder")


def check_canvas(backbone: Backbone) -> None:
    params = backbone.params
    multiple, why = KINDS[params.kind].multiple_for(backbone.model_config(), backbone.canvas_mode == "short-side")
    if backbone.canvas % multiple:
        raise PipelineError("params.yaml", "canvas", f"{backbone.canvas} px does not suit {params.kind} "
                            f"({params.model}): the canvas must be a multiple of {multiple} px ({why})")
