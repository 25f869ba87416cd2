"""The optimizer of a fault-tolerant run: it steps only when the replica groups commit."""
from __future__ import annotations

from typing import Any, Callable

import torch


class CommitGatedOptimizer(torch.optim.Optimizer):
    """Wraps the run's optimizer. While a fault-tolerant step is in flight (``gate`` set),
    ``step()`` asks the gate (torchft's commit vote) and steps only on a yes; outside of
    one (state initialization by checkpoint loading, LocalSGD and DiLoCo's inner steps)
    it steps at once. Everything else is the wrapped optimizer's."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # no super().__init__: state is inner's
        self.inner = inner
        self.gate: Callable[[], bool] | None = None

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("the fault-tolerant optimizer does not take a closure")
        if self.gate is None or self.gate():
            return self.inner.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    def __repr__(self) -> str:
        return f"CommitGatedOptimizer({self.inner!r})"
