"""Tokenizer and data pipeline: sources -> packed, resumable, layout-independent batches."""
from plait.data.embedded import embedded_tokenizer
from plait.data.loader import TokenLoader, build_dataloader
from plait.data.tokenizer import Tokenizer, load_tokenizer_file, with_special_tokens


def build_tokenizer(path: str = "", *, bos_token: str = "", eos_token: str = "") -> Tokenizer:
    """The embedded tokenizer for ``""``; otherwise a ``tokenizer.json`` file or a folder
    holding one (such as a downloaded Hugging Face model folder). ``bos_token``/``eos_token``
    name the begin/end-of-text tokens instead of the tokenizer's own."""
    if path:
        return load_tokenizer_file(path, bos_token=bos_token, eos_token=eos_token)
    return with_special_tokens(embedded_tokenizer(), bos_token=bos_token, eos_token=eos_token)


__all__ = ["TokenLoader", "Tokenizer", "build_dataloader", "build_tokenizer"]
