"""bf16 autocast that recasts the weights in the backward instead of keeping their casts."""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from plait.autocast import autocast_recasting_weights


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.proj = nn.Parameter(torch.randn(8, 16) / 4)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(x)))
        h = h @ self.proj.T  # a cast that autograd saves as a view
        return (h.float() * self.scale).square().mean()


def grads(context) -> list[torch.Tensor]:  # noqa: ANN001
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 5, 16, requires_grad=True)
    with context():
        net(x).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


class WeightCasts(TorchDispatchMode):
    """Weak references to every cast of ``weights`` made under the mode."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.casts: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.weights:
            self.casts.append(weakref.ref(out))
        return out


def test_gradients_are_those_of_plain_autocast():
    plain = grads(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    recast = grads(lambda: autocast_recasting_weights("cpu", torch.bfloat16))
    for ours, theirs in zip(recast, plain, strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_no_bf16_weight_outlives_its_use_in_the_forward():
    net, x = Net(), torch.randn(4, 16, requires_grad=True)
    weights = [net.up.weight, net.down.weight, net.proj]
    for context, kept in ((lambda: torch.autocast("cpu", dtype=torch.bfloat16), True),
                          (lambda: autocast_recasting_weights("cpu", torch.bfloat16), False)):
        casts = WeightCasts(weights)
        with context():
            with casts:
                loss = net(x)
            alive = [ref() is not None for ref in casts.casts]
            loss.backward()
        assert casts.casts and any(alive) is kept, (kept, alive)


def test_activations_and_fp32_tensors_are_saved_as_they_are():
    from plait.autocast import _pack

    weight = nn.Parameter(torch.randn(4, 4))
    activation = torch.randn(4, 4, requires_grad=True).to(torch.bfloat16)  # a cast, but not of a parameter
    assert _pack(activation) is activation
    assert _pack(weight) is weight
    assert _pack(weight.to(torch.bfloat16)).__class__.__name__ == "_ParameterCast"
    assert _pack(weight.to(torch.bfloat16).t()).recast().equal(weight.detach().to(torch.bfloat16).t())
