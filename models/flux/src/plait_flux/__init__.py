"""FLUX.1 diffusion transformer for plait: model, rectified-flow objective and its own data pipeline."""
