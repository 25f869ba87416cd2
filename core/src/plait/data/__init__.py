"""Tokenizer and data pipeline: sources -> packed, resumable, layout-independent batches."""
from plait.data.loader import TokenLoader, build_dataloader
from plait.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["TokenLoader", "Tokenizer", "build_dataloader", "build_tokenizer"]
