"""Thin DVC stage entry points: read params.yaml, call `pipeline/`. Run as `python -m stages.<name>`."""
