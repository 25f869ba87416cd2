"""plait-deepseek-v3: the DeepSeek-V3 decoder (multi-head latent attention, DeepSeekMoE)
for plait, with Hugging Face interop.

Importing this package is cheap (no torch); the model code lives in
``plait_deepseek_v3.model`` and is imported when the plugin is enabled.
"""
__version__ = "0.1.0"
