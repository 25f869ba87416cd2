"""Which modules a low-precision plugin (float8, mxfp8) converts, and why each other one
is skipped.

A decision is made for every ``nn.Linear`` of the model, and, where the plugin converts
MoE experts, for every ``GroupedExperts``, from three rules in this order: linears of a
MoE router stay in high precision (the router computes its logits itself, and the choice
of experts should not move with quantization noise); a ``filter_fqns`` pattern
(``plait.model_spec.module_path_matches`` syntax, ``*`` = one path component) that names
the module or a module above it skips it; then the plugin's shape rule (hardware
alignment, too small to gain) may skip it. The table of decisions is logged once at the
start of a run, and a run that would convert nothing is refused with it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from plait.errors import ConfigError
from plait.model_spec import module_path_matches

#: (out_features, in_features) -> the reason to skip a module of that shape, or None.
ShapeRule = Callable[[int, int], "str | None"]

LINEAR = "linear"
GROUPED_EXPERTS = "grouped experts"


@dataclass(frozen=True, slots=True)
class ModuleDecision:
    path: str
    out_features: int
    in_features: int
    converted: bool
    reason: str = ""
    kind: str = LINEAR
    """``LINEAR`` or ``GROUPED_EXPERTS`` (shapes: ``dim -> hidden_dim`` of each expert)."""


def _named_by(pattern: str, path: str) -> bool:
    parts = path.split(".")
    return any(module_path_matches(pattern, ".".join(parts[:end])) for end in range(1, len(parts) + 1))


def decide_modules(
    model: nn.Module,
    *,
    filter_fqns: Sequence[str],
    shape_rule: ShapeRule,
    grouped_experts: bool = False,
    experts_shape_rule: ShapeRule | None = None,
) -> list[ModuleDecision]:
    """A decision for each ``nn.Linear`` of ``model`` and, with ``grouped_experts``, each
    ``GroupedExperts``, in module order. The experts' shape rule (``shape_rule`` unless
    ``experts_shape_rule``) sees ``(hidden_dim, dim)`` and ``(dim, hidden_dim)``."""
    from plait.nn.moe import GroupedExperts, TopKRouter

    router_paths = [path for path, module in model.named_modules() if isinstance(module, TopKRouter)]
    decisions = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind, shapes = LINEAR, [(module.out_features, module.in_features)]
        elif grouped_experts and isinstance(module, GroupedExperts):
            hidden, dim = module.w1.shape[1], module.w1.shape[2]
            kind, shapes = GROUPED_EXPERTS, [(hidden, dim), (dim, hidden)]
        else:
            continue
        pattern = next((p for p in filter_fqns if _named_by(p, path)), None)
        if any(path.startswith(router + ".") for router in router_paths):
            reason = "MoE router (routing stays in high precision)"
        elif pattern is not None:
            reason = f"filter_fqns pattern {pattern!r}"
        else:
            rule = experts_shape_rule if kind == GROUPED_EXPERTS and experts_shape_rule else shape_rule
            reason = next((why for shape in shapes if (why := rule(*shape))), "")
        out_features, in_features = shapes[0]
        decisions.append(ModuleDecision(path=path, out_features=out_features, in_features=in_features,
                                        converted=not reason, reason=reason, kind=kind))
    return decisions


def converted_paths(decisions: Sequence[ModuleDecision], kind: str = LINEAR) -> set[str]:
    return {d.path for d in decisions if d.converted and d.kind == kind}


def format_table(title: str, decisions: Sequence[ModuleDecision]) -> str:
    """One line per module: converted or skipped, its shape (in -> out), the reason for a skip."""
    converted = sum(d.converted for d in decisions)
    lines = [f"{title}: {converted} of {len(decisions)} modules converted"]
    width = max((len(d.path) for d in decisions), default=0)
    for d in decisions:
        status = "converted" if d.converted else "skipped  "
        shape = f"{d.in_features}->{d.out_features}" + (" ×E" if d.kind == GROUPED_EXPERTS else "")
        lines.append(f"  {d.path:<{width}}  {shape:>14}  {status}  {d.reason}".rstrip())
    return "\n".join(lines)


def refuse_converting_nothing(plugin: str, model: str, decisions: Sequence[ModuleDecision], *,
                              hint: str = "") -> None:
    """One ``ConfigError`` with the table when ``--plugins plugin`` would convert no module."""
    if not any(d.converted for d in decisions):
        raise ConfigError(
            f"--plugins {plugin} would convert no module of {model}:\n" + format_table(plugin, decisions)
            + f"\nrelax --{plugin}.filter_fqns{hint}, or drop {plugin} from --plugins"
        )


#: logger name -> id of the config whose table that logger logged last.
_logged_for: dict[str, int] = {}


def log_table_once(logger: logging.Logger, title: str, decisions: Sequence[ModuleDecision], config: object) -> bool:
    """Log the table once per run (a run converts a model per chunk, and once more for its
    reference weights); True when it was logged now."""
    if _logged_for.get(logger.name) == id(config):
        return False
    _logged_for[logger.name] = id(config)
    logger.info("%s", format_table(title, decisions))
    return True
