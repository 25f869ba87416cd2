"""The llama3 model: sizes, initialization, forward, pipeline stages, tied embeddings."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from plait.testing import materialize
from plait_llama3.model import ModelArgs, count_parameters
from plait_llama3.spec import FLAVORS, llama3_spec

TINY = FLAVORS["debugmodel_tiny"]


def _materialize(args, **options):
    return materialize(llama3_spec(), args, **options)


def test_debug_flavors_fit_the_embedded_tokenizer() -> None:
    assert FLAVORS["debugmodel"].vocab_size == FLAVORS["debugmodel_tiny"].vocab_size == 2048
    assert (FLAVORS["debugmodel"].dim, FLAVORS["debugmodel"].n_layers, FLAVORS["debugmodel"].n_heads) == (256, 6, 16)


@pytest.mark.parametrize("tie", [False, True])
def test_init_weights_covers_every_tensor(tie: bool) -> None:
    args = dataclasses.replace(TINY, tie_word_embeddings=tie)
    model = _materialize(args, poison=True)

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), f"{name} was not initialized"
    assert torch.equal(model.norm.weight, torch.ones(args.dim))
    assert model.rope_cache.shape == (args.max_seq_len, 2 * args.head_dim)
    assert torch.equal(model.rope_cache[0], torch.cat([torch.ones(args.head_dim), torch.zeros(args.head_dim)]))
    head_std = model.output.weight.std().item()
    assert 0.5 * args.dim**-0.5 < head_std < 1.5 * args.dim**-0.5


def test_sequence_longer_than_rope_cache_is_refused() -> None:
    model = _materialize(dataclasses.replace(TINY, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_tied_embeddings_survive_materialization_and_train_together() -> None:
    args = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = _materialize(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)
    model(torch.randint(0, args.vocab_size, (1, 4))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_invalid_args_are_config_errors() -> None:
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible by n_heads"):
        ModelArgs(dim=30, n_heads=4)
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        ModelArgs(dim=48, n_heads=6, n_kv_heads=4)
