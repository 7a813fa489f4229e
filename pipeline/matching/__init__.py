"""Matching from cache: the protocols (`protocols`: DIFT's and sd-dino / GeoAware-SC's evaluations), feature
transforms applied at match time (`transforms`), predictions for a split (`match`), fusion of stores
(`fusion`) and edit propagation (`propagate`)."""
