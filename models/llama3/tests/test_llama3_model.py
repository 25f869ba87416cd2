"""The llama3 model: sizes, initialization, forward, pipeline stages, tied embeddings."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from plait_llama3.model import ModelArgs, Transformer, count_parameters
from plait_llama3.spec import FLAVORS, build_model

TINY = FLAVORS["debugmodel_tiny"]


def _materialize(args: ModelArgs, *, seed: int = 0, poison: bool = False) -> Transformer:
    """The core's recipe: build on meta, ``to_empty``, then ``init_weights``."""
    with torch.device("meta"):
        model = build_model(args)
    model.to_empty(device="cpu")
    if poison:  # stand-in for uninitialized memory: anything init_weights skips stays NaN
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.fill_(float("nan"))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize(
    ("flavor", "published_billions", "digits"),
    [("8B", 8.03, 2), ("70B", 70.6, 1), ("405B", 405.9, 1)],
)
def test_published_parameter_counts(flavor: str, published_billions: float, digits: int) -> None:
    with torch.device("meta"):
        model = build_model(FLAVORS[flavor])
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e9, digits) == published_billions
    assert n_params == count_parameters(FLAVORS[flavor])


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_count_parameters_matches_meta_build(flavor: str) -> None:
    args = FLAVORS[flavor]
    with torch.device("meta"):
        model = build_model(args)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)
    embedding = model.tok_embeddings.weight.numel()
    assert count_parameters(args, include_embedding=False) == count_parameters(args) - embedding
    assert all(p.device.type == "meta" for p in model.parameters())


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


def test_init_weights_is_deterministic_from_the_global_rng() -> None:
    first, again, other = _materialize(TINY, seed=3), _materialize(TINY, seed=3), _materialize(TINY, seed=4)
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
        if "norm" not in name:
            assert not torch.equal(a, c), name


def test_forward_shapes_and_causality() -> None:
    model = _materialize(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, TINY.vocab_size)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])


def test_sequence_longer_than_rope_cache_is_refused() -> None:
    model = _materialize(dataclasses.replace(TINY, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_pipeline_stages_compose_to_the_full_model() -> None:
    """Stages built the way the pipeline plugin builds them: drop blocks, set ends to None."""
    args = dataclasses.replace(TINY, n_layers=4)
    full = _materialize(args)
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    stages = []
    for keep in (("0",), ("1", "2"), ("3",)):
        stage = _materialize(args)
        stage.load_state_dict(full.state_dict())
        for name in list(stage.layers):
            if name not in keep:
                del stage.layers[name]
        stages.append(stage)
    stages[0].norm = stages[0].output = None
    stages[1].tok_embeddings = stages[1].norm = stages[1].output = None
    stages[2].tok_embeddings = None

    hidden = stages[0](tokens)
    assert hidden.shape == (2, 10, args.dim)
    hidden = stages[1](hidden)
    torch.testing.assert_close(stages[2](hidden), full(tokens))


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
