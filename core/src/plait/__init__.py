"""plait: a tiny PyTorch-native pretraining runtime; everything else is a plugin.

Importing this package is cheap (no torch): `plait plugins` and plugin discovery
rely on that. Heavy pieces are imported where they are used.
"""
from __future__ import annotations

from plait.hookspecs import PLUGIN_API_VERSION, hookimpl

__version__ = "0.1.0"


def from_pretrained(model_name: str, hf_dir: str, **kwargs):
    """Build ``model_name`` with the weights of a Hugging Face checkpoint folder.

    Returns the model in fp32 and eval mode; ``model(tokens[B, S]) -> logits[B, S, V]``.
    """
    from plait.hf import from_pretrained as _from_pretrained

    return _from_pretrained(model_name, hf_dir, **kwargs)


def generate(model, input_ids, *, max_new_tokens: int, **options):
    """Continue the prompts ``input_ids`` ``[batch, prompt]`` with a key/value cache:
    ``[batch, prompt + new]``, greedy unless sampling options are given (see
    ``plait.generation.generate`` for every option)."""
    from plait.generation import generate as _generate

    return _generate(model, input_ids, max_new_tokens=max_new_tokens, **options)


__all__ = ["PLUGIN_API_VERSION", "__version__", "from_pretrained", "generate", "hookimpl"]
