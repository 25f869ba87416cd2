"""The mixture-of-experts block against references written from its definition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.capabilities import simulated_device
from plait.errors import ConfigError
from plait.nn import moe as moe_module
from plait.nn.moe import (
    DispatchedTokens,
    LocalTokenDispatcher,
    MoE,
    MoEArgs,
    Routing,
    TopKRouter,
    configure_moe_layers,
    finish_moe_step,
    grouped_expert_swiglu,
    load_balance_loss,
    looped_expert_swiglu,
)


def _expert(x: torch.Tensor, layer: MoE, expert: int) -> torch.Tensor:
    experts = layer.experts
    return F.linear(F.silu(F.linear(x, experts.w1[expert])) * F.linear(x, experts.w3[expert]), experts.w2[expert])


def _layer(args: MoEArgs, *, dim: int = 16, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(dim=dim, args=args)
    with torch.no_grad():
        layer.init_weights(std=0.3, out_std=0.3)
    return layer


# --------------------------------------------------------------------------- experts


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [0, 0, 17, 0]], ids=["with-empty-expert", "one-expert"])
def test_grouped_matmuls_match_the_loop_forward_and_backward(counts: list[int]) -> None:
    torch.manual_seed(0)
    experts, dim, hidden = 4, 16, 24
    tokens_per_expert = torch.tensor(counts)
    leaves = [torch.randn(sum(counts), dim), torch.randn(experts, hidden, dim),
              torch.randn(experts, dim, hidden), torch.randn(experts, hidden, dim)]  # fmt: skip
    upstream = torch.randn(sum(counts), dim)

    results = []
    for implementation in (grouped_expert_swiglu, looped_expert_swiglu):
        tokens, w1, w2, w3 = (leaf.clone().requires_grad_() for leaf in leaves)
        out = implementation(tokens, tokens_per_expert, w1, w2, w3)
        (out * upstream).sum().backward()
        results.append([out, tokens.grad, w1.grad, w2.grad, w3.grad])
    for grouped, looped in zip(*results):
        torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    start = sum(counts[:2])
    expected_rows = _swiglu(leaves[0][start:start + counts[2]], *(w[2] for w in leaves[1:]))
    torch.testing.assert_close(results[0][0][start:start + counts[2]], expected_rows, rtol=1e-5, atol=1e-5)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def test_grouped_backward_takes_an_expanded_gradient() -> None:
    """``out.sum()`` sends a stride-0 gradient, which torch._grouped_mm's backward refuses."""
    tokens = torch.randn(6, 8, requires_grad=True)
    weights = [torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True),
               torch.randn(2, 4, 8, requires_grad=True)]  # fmt: skip
    grouped_expert_swiglu(tokens, torch.tensor([2, 4]), *weights).sum().backward()
    assert tokens.grad is not None and all(w.grad is not None for w in weights)


def test_auto_uses_grouped_mm_where_supported_and_the_loop_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(MoEArgs(num_experts=4, top_k=2, hidden_dim=8))
    x = torch.randn(2, 5, 16)
    used = []
    for name in ("grouped_expert_swiglu", "looped_expert_swiglu"):
        original = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, _name=name, _f=original: used.append(_name) or _f(*a))

    configure_moe_layers(layer, grouped_mm=simulated_device("cpu").capabilities.grouped_mm)  # PLATFORM 6b
    reference = layer(x)
    configure_moe_layers(layer, grouped_mm=False)  # a device without the capability
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-6)
    layer.experts.implementation = "grouped_mm"
    layer(x)
    assert used == ["grouped_expert_swiglu", "looped_expert_swiglu", "grouped_expert_swiglu"]


def test_experts_compute_in_the_autocast_dtype() -> None:
    layer = _layer(MoEArgs(num_experts=4, top_k=2, hidden_dim=8))
    x = torch.randn(2, 5, 16)
    outputs = []
    for implementation in ("grouped_mm", "loop"):
        layer.experts.implementation = implementation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(layer(x))
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outputs[0].float(), layer.float()(x), rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------- routing


def _reference_routing(scores: torch.Tensor, bias: torch.Tensor, args: MoEArgs) -> tuple[list, list]:
    """Per token, straight from the definition: choose by biased score within the best
    groups, weigh by the unbiased score."""
    chosen_all, weights_all = [], []
    for token_scores in scores.tolist():
        choice = [s + b for s, b in zip(token_scores, bias.tolist())]
        if args.group_limited:
            size = args.experts_per_group
            group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(args.num_groups)]
            allowed = sorted(range(args.num_groups), key=lambda g: -group_score[g])[: args.topk_groups]
            choice = [c if e // size in allowed else -math.inf for e, c in enumerate(choice)]
        chosen = sorted(range(args.num_experts), key=lambda e: -choice[e])[: args.top_k]
        weights = [token_scores[e] for e in chosen]
        if args.normalize_weights:
            weights = [w / sum(weights) for w in weights]
        chosen_all.append(chosen)
        weights_all.append([w * args.route_scale for w in weights])
    return chosen_all, weights_all


@pytest.mark.parametrize(
    ("args", "with_bias"),
    [
        (MoEArgs(num_experts=8, top_k=2, hidden_dim=4), False),
        (MoEArgs(num_experts=8, top_k=3, hidden_dim=4, normalize_weights=True), True),
        (MoEArgs(num_experts=8, top_k=2, hidden_dim=4, score_func="sigmoid", route_scale=2.5), True),
        (MoEArgs(num_experts=12, top_k=3, hidden_dim=4, score_func="sigmoid", num_groups=4, topk_groups=2,
                 normalize_weights=True, route_scale=1.5), True),
    ],
    ids=["softmax", "softmax-normalized-bias", "sigmoid-scaled-bias", "sigmoid-group-limited"],
)
def test_router_matches_the_definition(args: MoEArgs, with_bias: bool) -> None:
    torch.manual_seed(0)
    router = TopKRouter(dim=16, args=args)
    tokens = torch.randn(40, 16)
    bias = 0.3 * torch.randn(args.num_experts) if with_bias else torch.zeros(args.num_experts)

    routing = router(tokens, bias)

    logits = tokens.double() @ router.gate.weight.double().T
    scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
    chosen, weights = _reference_routing(scores, bias.double(), args)
    assert routing.experts.tolist() == chosen
    torch.testing.assert_close(routing.weights, torch.tensor(weights, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.scores, scores.float(), rtol=1e-5, atol=1e-6)
    counts = torch.bincount(routing.experts.flatten(), minlength=args.num_experts)
    assert torch.equal(routing.tokens_per_expert, counts)


def test_group_limited_routing_can_pass_over_the_best_expert() -> None:
    """Expert 0 scores highest, but its group (0, 1) sums lower than group (2, 3)."""
    args = MoEArgs(num_experts=8, top_k=2, hidden_dim=4, score_func="sigmoid", num_groups=4, topk_groups=1)
    router = TopKRouter(dim=8, args=args)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(8))  # logits = the token itself
    token = torch.tensor([[3.0, -3.0, 1.5, 1.5, -2.0, -2.0, -2.0, -2.0]])

    assert sorted(router(token).experts[0].tolist()) == [2, 3]
    unlimited = TopKRouter(dim=8, args=MoEArgs(num_experts=8, top_k=2, hidden_dim=4, score_func="sigmoid"))
    unlimited.load_state_dict(router.state_dict())
    assert unlimited(token).experts[0, 0].item() == 0


def test_bias_steers_the_choice_but_not_the_weights() -> None:
    router = TopKRouter(dim=16, args=MoEArgs(num_experts=6, top_k=2, hidden_dim=4))
    tokens = torch.randn(30, 16)
    bias = torch.zeros(6)
    bias[5] = 10.0

    routing = router(tokens, bias)

    assert (routing.experts[:, 0] == 5).all()
    torch.testing.assert_close(routing.weights, routing.scores.gather(1, routing.experts))
    assert routing.tokens_per_expert[5] == 30


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
def test_layer_output_is_the_weighted_sum_of_its_experts(implementation: str) -> None:
    args = MoEArgs(num_experts=6, top_k=2, hidden_dim=12, num_shared_experts=2, normalize_weights=True)
    layer = _layer(args)
    layer.experts.implementation = implementation
    x = torch.randn(2, 7, 16)

    out = layer(x)

    tokens = x.reshape(-1, 16)
    routing = layer.router(tokens, layer.expert_bias)
    expected = layer.shared_experts(tokens)
    for t in range(tokens.shape[0]):
        for k in range(args.top_k):
            expert = routing.experts[t, k].item()
            expected[t] = expected[t] + routing.weights[t, k] * _expert(tokens[t], layer, expert)
    torch.testing.assert_close(out, expected.view(2, 7, 16), rtol=1e-5, atol=1e-6)


def test_local_dispatch_groups_rows_by_expert_and_combine_inverts_it() -> None:
    routing = Routing(
        experts=torch.tensor([[2, 0], [0, 1], [2, 1]]),
        weights=torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0]]),
        scores=torch.zeros(3, 3),
        tokens_per_expert=torch.tensor([2, 2, 2]),
    )
    tokens = torch.arange(3.0).unsqueeze(1) + torch.tensor([[10.0, 20.0]])  # token t: [10 + t, 20 + t]
    dispatcher = LocalTokenDispatcher()

    dispatched = dispatcher.dispatch(tokens, routing)

    # expert 0 gets tokens 0 and 1, expert 1 tokens 1 and 2, expert 2 tokens 0 and 2
    assert dispatched.tokens[:, 0].tolist() == [10.0, 11.0, 11.0, 12.0, 10.0, 12.0]
    assert dispatched.tokens_per_expert.tolist() == [2, 2, 2]
    combined = dispatcher.combine(dispatched.tokens * 2, dispatched, routing)  # experts that double
    torch.testing.assert_close(combined, 2 * tokens * routing.weights.sum(dim=1, keepdim=True))


class _CountingDispatcher(LocalTokenDispatcher):
    def __init__(self) -> None:
        self.calls = []

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> DispatchedTokens:
        self.calls.append("dispatch")
        return super().dispatch(tokens, routing)

    def combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, routing: Routing) -> torch.Tensor:
        self.calls.append("combine")
        return super().combine(expert_outputs, dispatched, routing)


def test_configure_installs_the_dispatcher_and_the_aux_loss_weight() -> None:
    model = nn.ModuleDict({
        "dense": nn.Linear(4, 4),
        "layers": nn.ModuleDict({str(i): _layer(MoEArgs(num_experts=4, top_k=1, hidden_dim=8)) for i in range(2)}),
    })  # fmt: skip
    x = torch.randn(1, 3, 16)
    reference = model["layers"]["0"](x)
    dispatcher = _CountingDispatcher()

    assert configure_moe_layers(model, aux_loss_coeff=0.01, aux_loss_type="batch", grad_accumulation_steps=4,
                                dispatcher=dispatcher) == 2
    torch.testing.assert_close(model["layers"]["0"](x), reference)
    assert dispatcher.calls == ["dispatch", "combine"]
    assert all(layer.aux_loss_weight == 0.01 / 4 and layer.aux_loss_type == "batch"
               for layer in model["layers"].values())  # fmt: skip
    configure_moe_layers(model)
    assert model["layers"]["1"].dispatcher is dispatcher  # None keeps the installed one
    assert model["layers"]["1"].aux_loss_weight == 0.0


# --------------------------------------------------------------------------- balance


def test_bias_update_follows_the_sign_of_the_load_gap() -> None:
    layers = nn.ModuleDict({str(i): _layer(MoEArgs(num_experts=8, top_k=2, hidden_dim=4), seed=i) for i in range(2)})
    for layer in layers.values():
        layer(torch.randn(4, 9, 16))
    counts = [layer.tokens_per_expert.clone() for layer in layers.values()]
    assert all(c.sum() == 4 * 9 * 2 for c in counts)

    result = finish_moe_step([layers], bias_update_rate=0.01)

    for layer, layer_counts in zip(layers.values(), counts):
        mean = layer_counts.mean()
        expected = 0.01 * torch.where(layer_counts > mean, -1.0, torch.where(layer_counts < mean, 1.0, 0.0))
        torch.testing.assert_close(layer.expert_bias, expected)
        assert not layer.tokens_per_expert.any()
    ratios = [(c.max() / c.mean()).item() for c in counts]
    expected_per_layer = {"moe/layer0/max_load_ratio": ratios[0], "moe/layer1/max_load_ratio": ratios[1]}
    assert result.per_layer == pytest.approx(expected_per_layer)
    assert result.summary == pytest.approx({"moe/max_load_ratio": max(ratios)})
    assert finish_moe_step([nn.Linear(2, 2)], bias_update_rate=0.01) is None


def test_bias_updates_balance_a_skewed_router() -> None:
    layer = _layer(MoEArgs(num_experts=8, top_k=2, hidden_dim=4))
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.2  # expert 0 wins for tokens with positive features
    tokens = torch.randn(8, 32, 16).abs()

    ratios = []
    for _ in range(60):
        layer(tokens)
        ratios.append(finish_moe_step([layer], bias_update_rate=0.01).summary["moe/max_load_ratio"])

    assert ratios[0] > 3.5  # expert 0 takes nearly every token (the maximum is 8 / 2 = 4)
    assert max(ratios[-5:]) < 1.5
    assert layer.expert_bias[0] < 0


def test_eval_mode_does_not_count_tokens() -> None:
    layer = _layer(MoEArgs(num_experts=4, top_k=2, hidden_dim=4)).eval()
    layer.aux_loss_weight = 1.0
    layer(torch.randn(2, 3, 16))
    assert not layer.tokens_per_expert.any() and not layer.aux_loss_total.any()


def _reference_balance_loss(scores: torch.Tensor, experts: torch.Tensor, top_k: int) -> float:
    tokens, num_experts = scores.shape
    loss = 0.0
    for i in range(num_experts):
        chosen = sum(int(i in row) for row in experts.tolist())
        f = num_experts / (top_k * tokens) * chosen
        p = sum(row[i] / sum(row) for row in scores.tolist()) / tokens
        loss += f * p
    return loss


def test_balance_loss_value_sequence_and_batch_wise() -> None:
    torch.manual_seed(0)
    scores = torch.rand(6, 4)  # two sequences of three tokens; unnormalized, as sigmoid scores are
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 2], [3, 1], [2, 0]])
    routing = Routing(experts=experts, weights=torch.ones(6, 2), scores=scores, tokens_per_expert=torch.zeros(4))

    batch = load_balance_loss(routing)
    per_sequence = load_balance_loss(routing, sequences=2)

    assert batch.item() == pytest.approx(_reference_balance_loss(scores, experts, 2), rel=1e-6)
    halves = [_reference_balance_loss(scores[i:i + 3], experts[i:i + 3], 2) for i in (0, 3)]
    assert per_sequence.item() == pytest.approx(sum(halves) / 2, rel=1e-6)
    assert per_sequence.item() != pytest.approx(batch.item(), rel=1e-3)

    balanced = Routing(experts=torch.tensor([[0], [1], [2], [3]]), weights=torch.ones(4, 1),
                       scores=torch.full((4, 4), 0.25), tokens_per_expert=torch.ones(4))  # fmt: skip
    assert load_balance_loss(balanced).item() == pytest.approx(1.0)


def test_aux_loss_adds_its_gradient_without_changing_the_output() -> None:
    args = MoEArgs(num_experts=6, top_k=2, hidden_dim=8)
    x = torch.randn(3, 5, 16)
    upstream = torch.randn(3, 5, 16)

    with_aux = _layer(args)
    with_aux.aux_loss_weight = 0.3
    out = with_aux(x)
    (out * upstream).sum().backward()

    plain = _layer(args)
    plain_out = plain(x)
    routing = plain.router(x.reshape(-1, 16), plain.expert_bias)
    ((plain_out * upstream).sum() + 0.3 * load_balance_loss(routing, sequences=3)).backward()

    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(with_aux.router.gate.weight.grad, plain.router.gate.weight.grad)
    assert with_aux.aux_loss_total[1] == 1
    assert finish_moe_step([with_aux], bias_update_rate=0.0).summary["moe/aux_loss"] == pytest.approx(
        load_balance_loss(routing, sequences=3).item()
    )
    assert not with_aux.expert_bias.any()  # rate 0: no update


def test_invalid_args_are_config_errors() -> None:
    cases = [
        (dict(num_experts=4, top_k=5, hidden_dim=8), "top_k \\(5\\) must be between 1 and num_experts \\(4\\)"),
        (dict(num_experts=6, top_k=2, hidden_dim=8, num_groups=4), "num_groups \\(4\\) must be positive and divide"),
        (dict(num_experts=8, top_k=2, hidden_dim=8, num_groups=4, topk_groups=5), "topk_groups \\(5\\) must be"),
        (dict(num_experts=8, top_k=3, hidden_dim=8, num_groups=4, topk_groups=1), r"top_k \(3\) exceeds the 2"),
        (dict(num_experts=8, top_k=2, hidden_dim=0), "must be positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            MoEArgs(**kwargs)


def test_dispatcher_expert_count_must_match_the_local_experts() -> None:
    layer = _layer(MoEArgs(num_experts=4, top_k=1, hidden_dim=8))
    with pytest.raises(ValueError, match="rows for 2 experts, but this rank holds 4"):
        layer.experts(torch.randn(3, 16), torch.tensor([1, 2]))


def test_layer_compiles_as_one_graph_and_matches_eager() -> None:
    """The core compiles each block with fullgraph=True: routing, dispatch, the experts
    (fp32 here, so the looped operator), the counters and the balance loss must all trace."""
    layer = _layer(MoEArgs(num_experts=4, top_k=2, hidden_dim=16, normalize_weights=True))
    layer.aux_loss_weight = 0.1
    x = torch.randn(2, 8, 16)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()

    layer.compile(fullgraph=True)
    compiled = layer(x)
    compiled.sum().backward()

    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for grad, eager_grad in zip([p.grad for p in layer.parameters()], eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)
    assert layer.tokens_per_expert.sum() == 2 * (2 * 8 * 2)  # both forwards counted


def test_moe_block_under_activation_checkpointing_runs_grouped_mm():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from plait.nn import moe

    torch.manual_seed(0)
    layer = moe.MoE(dim=16, args=moe.MoEArgs(num_experts=4, top_k=2, hidden_dim=16))
    layer.init_weights(std=0.02, out_std=0.02)
    x = torch.randn(2, 8, 16, requires_grad=True)
    checkpoint_wrapper(layer, preserve_rng_state=False)(x).sum().backward()
    assert x.grad is not None and layer.router.gate.weight.grad is not None


def test_gate_in_float32_ignores_the_compute_dtype() -> None:
    """Under bf16 autocast the gate's logits come out of a float32 matmul with
    ``gate_in_float32`` (DeepSeek-V3, as the HF model does) and of a bf16 one without."""
    import dataclasses

    torch.manual_seed(0)
    args = MoEArgs(num_experts=8, top_k=2, hidden_dim=16, score_func="sigmoid")
    router = TopKRouter(dim=64, args=dataclasses.replace(args, gate_in_float32=True))
    tokens = torch.randn(32, 64)
    exact = (tokens @ router.gate.weight.T).sigmoid()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_float32 = router(tokens).scores
        router.args = args
        in_bf16 = router(tokens).scores
    assert torch.allclose(in_float32, exact, atol=1e-6)
    assert not torch.allclose(in_bf16, exact, atol=1e-4)
