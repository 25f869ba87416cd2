"""MoE.group_alignment: each expert's rows are padded to a multiple of the alignment before
the experts run (low-precision expert kernels quantize blocks of 32 rows), whatever the
dispatcher; the padding changes no output and no gradient."""
from __future__ import annotations

import copy

import pytest
import torch

from plait.nn.moe import MoE, MoEArgs, Routing, align_token_groups, configure_moe_layers
from plait.train_state import RunNeeds


def test_groups_of_44_and_0_are_padded_to_32():
    counts = torch.tensor([44, 0, 20, 33])
    tokens = torch.arange(97, dtype=torch.float32).unsqueeze(1).repeat(1, 4) + 1
    aligned = align_token_groups(tokens, counts, 32)
    padded = aligned.tokens_per_expert.tolist()
    assert padded[:3] == [64, 0, 32] and padded[3] % 32 == 0 and padded[3] >= 64
    assert sum(padded) == aligned.tokens.shape[0] == 224  # round_up(97 + 4 * 31, 32), a static bound
    assert torch.equal(aligned.tokens[aligned.positions], tokens)
    starts = [0, 64, 64, 96]
    for expert, (start, count) in enumerate(zip(starts, counts.tolist())):
        group = aligned.tokens[start : start + padded[expert]]
        assert torch.equal(group[:count], tokens[sum(counts[:expert].tolist()):][:count])
        assert not group[count:].any()  # the padding is zeros


class _FixedRouting(torch.nn.Module):
    """Routes token i to expert ``experts[i]`` only, with weight 1: groups of chosen sizes."""

    def __init__(self, experts: torch.Tensor, num_experts: int) -> None:
        super().__init__()
        self.experts, self.num_experts = experts, num_experts

    def forward(self, tokens: torch.Tensor, expert_bias: torch.Tensor | None = None) -> Routing:
        experts = self.experts.unsqueeze(1)
        weights = torch.ones(experts.shape, dtype=torch.float32)
        counts = torch.zeros(self.num_experts, dtype=torch.int64).scatter_add_(0, self.experts, torch.ones_like(self.experts))
        return Routing(experts=experts, weights=weights, scores=torch.full((len(experts), self.num_experts), 0.25),
                       tokens_per_expert=counts)


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
def test_padding_changes_neither_outputs_nor_gradients(implementation):
    torch.manual_seed(0)
    layer = MoE(dim=32, args=MoEArgs(num_experts=4, top_k=1, hidden_dim=32))
    layer.init_weights(std=0.1, out_std=0.1)
    layer.experts.implementation = implementation
    experts = torch.tensor([0] * 44 + [2] * 20 + [3] * 32)[torch.randperm(96)]  # expert 1 gets 0 tokens
    layer.router = _FixedRouting(experts, 4)
    padded = copy.deepcopy(layer)
    assert configure_moe_layers(padded, group_alignment=32) == 1 and padded.group_alignment == 32
    x = torch.randn(2, 48, 32)
    results = []
    for module in (layer, padded):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        out.square().sum().backward()
        results.append((out, inputs.grad, module.experts.w1.grad, module.experts.w2.grad))
    for reference, actual in zip(*results):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)


def test_plugins_alignments_combine_to_their_lcm():
    needs = RunNeeds.combine([RunNeeds(moe_group_alignment=32), RunNeeds(moe_group_alignment=16), RunNeeds()])
    assert needs.moe_group_alignment == 32
    assert RunNeeds.combine([]).moe_group_alignment == 1
