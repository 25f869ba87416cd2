"""The generator's log-probabilities against the trainer's recomputation (same model class,
fp32, CPU), and how far batching and the KV cache move them."""
import torch
import torch.nn.functional as F

from plait.generation import KVCache
from plait_rl.logprobs import completion_logprobs
from plait_rl.rollout import micro_batch_rows

# Measured bounds (README): batch composition and the cache path change the last bits only.
BATCH_BOUND = 1e-5
CACHE_BOUND = 1e-5


def trainer_logprobs(model, rollout, rows: slice, temperature: float) -> torch.Tensor:
    """What the trainer computes in its forward_backward: gradients on, train mode."""
    out = completion_logprobs(model, rollout.tokens[rows], prompt_mask=rollout.prompt_mask[rows],
                              temperature=temperature, vocab_size=2048)
    assert out.requires_grad
    return out.detach()


def test_generator_logprobs_equal_the_trainers_bit_for_bit(generator, trainer_model, tiny_setup) -> None:
    rollout = generator.rollout(index=0, version=0)
    assert bool((rollout.prompt_mask == 0).any()), "the batch should hold left-padded prompts"
    n = rollout.tokens.shape[0]
    for micro_batch in range(n // tiny_setup.micro_batch_rows):
        rows = micro_batch_rows(micro_batch=micro_batch, dp_rank=0, dp_degree=1, rows=tiny_setup.micro_batch_rows)
        ours = trainer_logprobs(trainer_model, rollout, rows, tiny_setup.rl.temperature)
        assert torch.equal(ours, rollout.logprobs[rows]), (ours - rollout.logprobs[rows]).abs().max()


def test_batch_composition_changes_logprobs_by_at_most_a_bound(generator, trainer_model, tiny_setup) -> None:
    """Whether CPU matmuls are batch-invariant here: each row alone, and the whole batch at
    once, against the generator's chunks of 4 rows. Prints the measured differences."""
    rollout = generator.rollout(index=1, version=0)
    mask = rollout.completion_mask.bool()
    n = rollout.tokens.shape[0]
    whole = trainer_logprobs(trainer_model, rollout, slice(0, n), tiny_setup.rl.temperature)
    alone = torch.cat([trainer_logprobs(trainer_model, rollout, slice(i, i + 1), tiny_setup.rl.temperature)
                       for i in range(n)])
    whole_diff = (whole - rollout.logprobs)[mask].abs().max().item()
    alone_diff = (alone - rollout.logprobs)[mask].abs().max().item()
    print(f"batch {n} vs chunks of 4: max |dlogp| {whole_diff:.3g}; batch 1 vs chunks of 4: {alone_diff:.3g}")
    assert whole_diff <= BATCH_BOUND and alone_diff <= BATCH_BOUND


def test_cached_decoding_logprobs_stay_within_a_bound_of_the_full_forward(generator, tiny_setup) -> None:
    """plait.generate samples from the KV-cache path (one token per call); the loss uses a
    full forward. Teacher-force the sampled tokens through the cache and compare."""
    rollout = generator.rollout(index=2, version=0)
    model, tokens, prompt_mask = generator.model, rollout.tokens, rollout.prompt_mask
    prompt_len, new = prompt_mask.shape[1], rollout.completion_mask.shape[1]
    cache = KVCache(batch_size=tokens.shape[0], max_len=tokens.shape[1], device="cpu", attention_mask=prompt_mask)
    with torch.inference_mode():
        logits = [model(tokens[:, :prompt_len], cache=cache)[:, -1]]
        for column in range(prompt_len, prompt_len + new - 1):
            logits.append(model(tokens[:, column : column + 1], cache=cache)[:, -1])
    logits = torch.stack(logits, dim=1).float() / tiny_setup.rl.temperature
    cached = torch.gather(F.log_softmax(logits, dim=-1), -1, tokens[:, prompt_len:, None]).squeeze(-1)
    mask = rollout.completion_mask.bool()
    difference = (cached - rollout.logprobs)[mask].abs().max().item()
    print(f"KV-cache decoding vs full forward: max |dlogp| {difference:.3g}")
    assert difference <= CACHE_BOUND


def test_reference_logprobs_come_from_the_reference_weights(generator, tiny_setup) -> None:
    """With a KL penalty the generator scores each rollout under the reference policy too:
    with the policy's own weights that is the same numbers, with others different ones."""
    import copy

    from plait_rl.generator import Generator

    same = Generator(tiny_setup, generator.model, reference=copy.deepcopy(generator.model),
                     tokenizer=generator.tokenizer).rollout(index=3, version=0)
    assert torch.equal(same.ref_logprobs, same.logprobs)
    other = copy.deepcopy(generator.model)
    with torch.no_grad():
        other.output.weight.mul_(1.5)
    shifted = Generator(tiny_setup, generator.model, reference=other, tokenizer=generator.tokenizer).rollout(3, 0)
    assert torch.equal(shifted.tokens, same.tokens)  # the same seed samples the same completions
    assert not torch.allclose(shifted.ref_logprobs, shifted.logprobs)
