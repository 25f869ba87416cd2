"""plait-qwen3: the Qwen3 decoder (dense and mixture of experts) for plait, with Hugging
Face interop.

Importing this package is cheap (no torch); the model code lives in
``plait_qwen3.model`` and is imported when the plugin is enabled.
"""
__version__ = "0.1.0"
