"""Tokenizer and data pipeline: sources -> packed, resumable, layout-independent batches."""
from plait.data.embedded import embedded_tokenizer
from plait.data.loader import TokenLoader, build_dataloader
from plait.data.tokenizer import Tokenizer, load_tokenizer_file


def build_tokenizer(path: str = "") -> Tokenizer:
    """The embedded tokenizer for ``""``; otherwise a ``tokenizer.json`` file or a folder
    holding one (such as a downloaded Hugging Face model folder)."""
    return embedded_tokenizer() if not path else load_tokenizer_file(path)


__all__ = ["TokenLoader", "Tokenizer", "build_dataloader", "build_tokenizer"]
