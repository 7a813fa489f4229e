"""dift-cache: cache diffusion features for semantic correspondence, match and score offline."""
