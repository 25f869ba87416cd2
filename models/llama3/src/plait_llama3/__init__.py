"""plait-llama3: the Llama 3 / 3.1 decoder for plait, with Hugging Face interop.

Importing this package is cheap (no torch); the model code lives in
``plait_llama3.model`` and is imported when the plugin is enabled.
"""
__version__ = "0.1.0"
