"""Backbones: what turns a model-space latent (or the canvas) into per-layer feature maps.

One file per model family: `sd2.py` (U-Net), `sd3.py` (MMDiT), `flux.py`, `vae.py` (the latents
themselves), `vit.py` (DINOv2, CLIP). `base.py`: the `Backbone` interface and the forward-hook capture
they share; `parts.py`: where components are loaded from; `registry.py`: kind -> class. What each kind is
(reads pixels or latents, canvas multiple, offload) is declared in pipeline/models/kinds.py.
"""
