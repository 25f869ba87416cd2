"""plait.generate: the sampler, the cache's masks and positions, stopping, training samples."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import plait
from plait.errors import ConfigError
from plait.generation import KVCache, next_token_scores

from toy_model import ToyModelPlugin, toy_config, train_toy


class FixedLogits(nn.Module):
    """Next-token logits that do not depend on the input (no cache: full recompute)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*tokens.shape, -1)


LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
PROMPT = torch.zeros(64, 1, dtype=torch.long)  # 64 rows sampled at once


def sample(**options):
    return plait.generate(FixedLogits(LOGITS), PROMPT, max_new_tokens=6, **options)[:, 1:]


def test_greedy_by_default_and_sampling_reproducible_with_a_seed():
    assert (sample() == 0).all()
    assert (sample(temperature=0, top_k=4) == 0).all()  # temperature 0 is greedy whatever else is given
    first, again, other = sample(temperature=1.0, seed=3), sample(temperature=1.0, seed=3), sample(temperature=1.0,
                                                                                                   seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(first.unique()) > 4  # it does sample
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    sample(temperature=1.0)  # unseeded sampling leaves the global RNG alone
    assert torch.equal(torch.rand(1), before)


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    assert set(sample(top_k=3, seed=0).unique().tolist()) == {0, 1, 2}
    probs = LOGITS.softmax(-1)  # 0.41, 0.25, 0.15, 0.06, ...: the first three hold 0.81
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    assert set(sample(top_p=0.8, seed=0).unique().tolist()) == {0, 1, 2}
    assert set(sample(top_p=0.3, seed=0).unique().tolist()) == {0}  # the most likely token is always kept
    scores = next_token_scores(LOGITS[None], top_k=2, top_p=1.0, temperature=2.0)
    assert torch.equal(scores[0, :2], LOGITS[:2] / 2) and torch.isinf(scores[0, 2:]).all()


def test_ids_beyond_the_tokenizers_vocabulary_are_never_produced():
    padded = torch.cat((LOGITS, torch.full((4,), 100.0)))  # padding rows of a larger embedding
    model = FixedLogits(padded)
    assert (plait.generate(model, PROMPT, max_new_tokens=2)[:, 1:] >= 8).all()
    assert (plait.generate(model, PROMPT, max_new_tokens=2, vocab_size=8)[:, 1:] == 0).all()
    assert (plait.generate(model, PROMPT, max_new_tokens=4, vocab_size=8, temperature=5.0, seed=0)[:, 1:] < 8).all()


def test_rows_stop_at_end_of_text_and_pad_after_it():
    model = FixedLogits(torch.tensor([0.0, 1.0, 5.0]))  # greedy: always 2
    out = plait.generate(model, torch.tensor([[1], [2]]), max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    assert out.tolist() == [[1, 2], [2, 2]]  # every row finished after one token: generation stops
    sampled = plait.generate(FixedLogits(torch.zeros(3)), torch.ones(32, 1, dtype=torch.long), max_new_tokens=6,
                             temperature=1.0, seed=0, eos_token_id=2, pad_token_id=7)  # fmt: skip
    for row in sampled[:, 1:].tolist():
        if 2 in row:
            assert set(row[row.index(2) + 1:]) <= {7}
    assert (sampled[:, 1:] == 7).any()


def test_the_cache_masks_padding_and_counts_positions_from_each_rows_first_token():
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    cache = KVCache(batch_size=2, max_len=5, device="cpu", attention_mask=mask)
    cache.append(3)
    assert cache.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert cache.mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert cache.mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    layer = cache.layer("0")
    (keys,) = layer.update(k=torch.ones(2, 4, 3, 8))
    cache.append(1)
    assert cache.positions.tolist() == [[3], [1]]
    assert cache.mask[:, 0].tolist() == [[[True, True, True, True]], [[False, False, True, True]]]
    (keys,) = cache.layer("0").update(k=torch.full((2, 4, 1, 8), 2.0))
    assert keys.shape == (2, 4, 4, 8) and (keys[:, :, 3] == 2).all() and (keys[:, :, :3] == 1).all()
    with pytest.raises(ValueError, match="holds 5 columns"):
        cache.append(2)


@pytest.mark.parametrize(("options", "message"), [
    ({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"), ({"top_k": 0}, "top_k must be"),
    ({"temperature": -1.0}, "temperature must be"), ({"max_new_tokens": -1}, "max_new_tokens must be"),
    ({"attention_mask": torch.ones(2, 2)}, "attention_mask"),
])  # fmt: skip
def test_bad_options_are_refused(options, message):
    options = {"max_new_tokens": 2, **options}
    with pytest.raises(ValueError, match=message):
        plait.generate(FixedLogits(LOGITS), PROMPT, **options)


def test_a_model_without_the_cache_refuses_padded_batches():
    mask = torch.ones(64, 1, dtype=torch.long)
    mask[0] = 0
    with pytest.raises(ValueError, match="cannot read padded batches"):
        plait.generate(FixedLogits(LOGITS), PROMPT, max_new_tokens=2, attention_mask=mask)


def test_training_samples_leave_the_losses_bit_for_bit(tmp_path, caplog):
    _, plain = train_toy(toy_config(tmp_path / "plain", steps=3), ToyModelPlugin())
    with caplog.at_level(logging.INFO, logger="plait"):
        _, sampled = train_toy(toy_config(tmp_path / "sampled", steps=3, sample_interval=2, sample_max_new_tokens=4,
                                          sample_prompts=("Once upon",)), ToyModelPlugin())  # fmt: skip
    assert sampled.losses == plain.losses
    lines = [r.getMessage() for r in caplog.records if "  samples:" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["2", "3"]  # every 2 steps and after the last
    assert "'Once upon' -> " in lines[0]


def test_training_samples_refuse_a_sharded_model_and_a_too_long_prompt(tmp_path):
    from plait.data import build_tokenizer
    from plait.training_samples import GreedyContinuations, TrainingSamples

    config = toy_config(tmp_path, sample_interval=1)
    config.parallelism.dp_shard = 2
    tokenizer = build_tokenizer("")
    with pytest.raises(ConfigError, match=r"needs the whole model on one process, but this run has 2 ranks \(dp_shard 2\)"):
        TrainingSamples(config, GreedyContinuations(config, tokenizer, device=torch.device("cpu"), max_len=None),
                        world_size=2)
    config = toy_config(tmp_path, sample_interval=1, sample_max_new_tokens=10)
    with pytest.raises(ConfigError, match="make .* tokens, more than the model's 8"):
        GreedyContinuations(config, tokenizer, device=torch.device("cpu"), max_len=8)
    config.training.sample_prompts = ()
    with pytest.raises(ConfigError, match="needs --training.sample_prompts"):
        config.validate()


def test_the_result_is_an_ordinary_tensor_that_a_training_forward_can_take():
    out = plait.generate(FixedLogits(LOGITS), PROMPT[:2], max_new_tokens=2)
    assert not out.is_inference()
    embedding = nn.Embedding(8, 4)
    embedding(out).sum().backward()  # inference tensors cannot be saved for backward
    assert embedding.weight.grad is not None
