"""dift-cache: cache diffusion features for semantic correspondence, match and score offline.

The flow, one sub-package a step: `data` (SPair-71k -> pairs and images tables) -> `models` (pipeline
folders, backbones) -> `cache` (images -> latents -> features stores) -> `matching` (stores ->
predictions) -> `evaluation` (predictions -> PCK, figures). `demo` makes the demo's dataset and tiny
random models (test fixtures, never used by a real run). Across them: `config` (params.yaml), `plan`
(costs before any GPU time), `cluster` (dask), `errors` (one-line faults).
"""
