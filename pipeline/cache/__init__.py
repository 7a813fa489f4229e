"""The cache: Zarr stores written and read in one place (`store`: layout, fingerprint, writer lock;
`maps`: a features store as feature maps), filled by `encode` (images -> latents) and `extract`
(latents -> features), checked by `verify`."""
