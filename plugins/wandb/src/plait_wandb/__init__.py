"""plait plugin: Weights & Biases logging (see README.md)."""
