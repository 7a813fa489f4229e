"""Evaluation: PCK from predictions tables (`metrics`), predictions as xarray (`analysis`), and the study's
figures and report (`figures`)."""
