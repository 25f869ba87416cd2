"""The objectives against hand computations on a fixed batch of two completions (one group)."""
import math

import pytest
import torch

from plait_rl.config import RLSection
from plait_rl.losses import group_advantages, groups_with_spread, policy_loss, token_weights

# Group of two: rewards 1 and 0. Completion 0 has two tokens, completion 1 one (of L = 3).
REWARDS = torch.tensor([1.0, 0.0])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
OLD = torch.log(torch.tensor([[0.2, 0.4, 0.5], [0.6, 0.5, 0.5]]))
# new / old probabilities: 1.5 and 1.0 for completion 0, 0.5 for completion 1 (padding: anything)
NEW = OLD + torch.log(torch.tensor([[1.5, 1.0, 7.0], [0.5, 3.0, 3.0]]))
STD_A = 0.5 / (math.sqrt(0.5) + 1e-4)  # |advantage|: group std (unbiased) of {1, 0} is sqrt(0.5)


def loss_of(rl: RLSection, new: torch.Tensor = NEW, ref: torch.Tensor | None = None):
    advantages = group_advantages(REWARDS, 2, scaling=rl.advantage_scaling)
    keep = groups_with_spread(REWARDS, 2) if rl.filter_equal_groups else None
    weights = token_weights(MASK, normalization=rl.normalization, max_new_tokens=3, keep=keep)
    return policy_loss(new, OLD, advantages, weights, clip_low=rl.clip_low, clip_high=rl.upper_clip,
                       ref_logprobs=ref, kl_coef=rl.kl_coef)


def test_grpo_loss_equals_hand_computation() -> None:
    out = loss_of(RLSection(loss="grpo"))
    # completion 0 (A = +a): min(1.5a, 1.2a) = 1.2a (clipped), then 1.0a; completion 1 (A = -a):
    # min(-0.5a, -0.8a) = -0.8a (clipped). Mean over each completion's tokens, then over completions.
    a = STD_A
    expected = ((-1.2 * a - a) / 2 + 0.8 * a) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.clipped[MASK.bool()].tolist() == [True, False, True]


def test_dr_grpo_loss_equals_hand_computation() -> None:
    out = loss_of(RLSection(loss="dr_grpo"))
    # advantages unscaled (+-0.5); each completion's token sum over L = 3, then the mean over completions
    expected = ((-1.2 * 0.5 - 0.5) / 3 + (0.8 * 0.5) / 3) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_dapo_loss_equals_hand_computation() -> None:
    out = loss_of(RLSection(loss="dapo"))
    # clip-higher: 1 + 0.28; token mean over all 3 completion tokens of the batch
    a = STD_A
    expected = (-1.28 * a - a + 0.8 * a) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_dapo_drops_groups_of_equal_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    keep = groups_with_spread(rewards, 2)
    weights = token_weights(torch.ones(4, 2), normalization="token", max_new_tokens=2, keep=keep)
    assert keep.tolist() == [True, True, False, False]
    assert weights.tolist() == [[0.25, 0.25], [0.25, 0.25], [0.0, 0.0], [0.0, 0.0]]


def test_kl_penalty_is_k3_to_the_reference() -> None:
    ref = OLD.clone()
    ref[0, 0] = NEW[0, 0] + math.log(2.0)  # reference twice as likely as the policy on one token
    out = loss_of(RLSection(loss="dr_grpo", kl_coef=0.1), ref=ref)
    k3 = 2.0 - math.log(2.0) - 1  # exp(d) - d - 1 with d = log 2
    assert out.kl[0, 0].item() == pytest.approx(k3, rel=1e-6)
    without = loss_of(RLSection(loss="dr_grpo"))
    kl_terms = sum(out.kl[i, t].item() / (3 * 2) for i, t in ((0, 0), (0, 1), (1, 0)))
    assert out.loss.item() - without.loss.item() == pytest.approx(0.1 * kl_terms, rel=1e-5)


def test_on_policy_ratio_is_one_and_gradient_is_the_policy_gradient() -> None:
    new = OLD.clone().requires_grad_(True)
    out = loss_of(RLSection(loss="grpo"), new=new)
    assert torch.equal(out.ratio, torch.ones_like(OLD))
    assert not out.clipped.any()
    out.loss.backward()
    a = STD_A
    expected = torch.tensor([[-a / 4, -a / 4, 0.0], [a / 2, 0.0, 0.0]])  # -w * A
    torch.testing.assert_close(new.grad, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("group_size", 1, "--rl.group_size must be >= 2"),
    ("temperature", 0.0, "--rl.temperature must be > 0"),
    ("max_policy_lag", -1, "--rl.max_policy_lag must be >= 0"),
])  # fmt: skip
def test_bad_options_are_refused_with_the_option_named(option: str, value: object, message: str) -> None:
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RLSection(**{option: value}).validate()


def test_off_policy_lag_needs_generator_processes() -> None:
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match="--rl.max_policy_lag 2 needs generator processes"):
        RLSection(generators=0, max_policy_lag=2).validate()
