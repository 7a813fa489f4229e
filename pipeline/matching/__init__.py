"""Matching from cache: the protocols (`protocols`: DIFT's exact evaluation, FAISS-refined `fast`), feature
transforms applied at match time (`transforms`), predictions for a split (`match`), fusion of stores
(`fusion`) and edit propagation (`propagate`)."""
