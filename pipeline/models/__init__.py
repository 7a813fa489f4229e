"""Models: pipeline folders under models/ (`fetch`: hub snapshots pinned to a revision, `realsize`: real
architectures with random weights), the hub access they share (`hub`), and `backbones`: what turns a
latent into per-layer feature maps, one file per model family."""
