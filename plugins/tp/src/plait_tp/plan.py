"""From a model spec's TP plan (path pattern -> style name) to torch ``ParallelStyle``s
applied on the tp mesh.

Patterns are dotted module paths whose components may hold shell wildcards
(``layers.*.attention.wq``); each component matches exactly one component of a real
module path, so ``layers.*`` never reaches into ``layers.0.attention``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import torch
from plait.errors import ConfigError
from plait.model_spec import TP_STYLE_CLASSES, TPStyle, module_path_matches
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(kw_only=True, frozen=True, slots=True)
class StyleOptions:
    sequence_parallel: bool = True
    loss_parallel: bool = True
    expert_parallel: bool = False
    """The ep plugin holds the experts: MoE layers split their tokens, not the experts, over tp."""


class ReplicatedParameters(ParallelStyle):
    """Replicates a module's parameters as DTensors and runs it on replicated inputs.

    Used for norms when sequence parallelism is off: every parameter of the model is
    then a DTensor, so one optimizer step (foreach / fused) can update all of them.
    Inputs arrive as plain replicated tensors and leave as plain tensors.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, _replicate_parameters, _inputs_as_replicated, _outputs_as_local
        )


def _replicate_parameters(name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        replicated = DTensor.from_local(param, device_mesh, [Replicate()], run_check=False)
        module.register_parameter(param_name, nn.Parameter(replicated, requires_grad=param.requires_grad))


def _inputs_as_replicated(module: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple[Any, ...]:
    return tuple(
        DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
        else x
        for x in inputs
    )


def _outputs_as_local(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


class EmbeddingParallel(RowwiseParallel):
    """Vocabulary-parallel embedding whose output collective completes before the
    output leaves the module. torch's row-wise style leaves it in flight (an
    ``AsyncCollectiveTensor``); handed as is to a compiled block, its backward reached
    the collective without the DTensor wrapper and failed (torch 2.13, CPU/gloo)."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):  # noqa: ANN001, ANN205
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts)
        return outputs.to_local() if use_local_output else outputs


class MixtureOfExpertsParallel(ParallelStyle):
    """A ``plait.nn.MoE`` layer with its experts' hidden features sharded (see ``plait_tp.moe``)."""

    def __init__(self, *, sequence_parallel: bool, expert_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.expert_parallel = expert_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from plait_tp.moe import parallelize_moe

        parallelize_moe(
            module, device_mesh, sequence_parallel=self.sequence_parallel, expert_parallel=self.expert_parallel
        )
        return module


class SumInputGradient(ParallelStyle):
    """Leaves the module's first input unchanged and sums its gradient over the tp ranks:
    for a tensor every rank computes in full but uses only for its own heads (the
    rotary key that multi-head latent attention shares among all heads)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from plait_tp.moe import sum_gradient

        def summed(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            x, *rest = inputs
            return (sum_gradient(x, device_mesh), *rest)

        module.register_forward_pre_hook(summed)
        return module


pattern_matches = module_path_matches


def resolve_plan(module_paths: Iterable[str], styles: Mapping[str, TPStyle]) -> dict[str, TPStyle]:
    """Real module path -> style, in module order. Patterns that match nothing are fine (a
    pipeline chunk lacks some modules); a path matched by two patterns with different
    styles is an error in the plan."""
    resolved: dict[str, TPStyle] = {}
    for path in module_paths:
        matches = {pattern: style for pattern, style in styles.items() if pattern_matches(pattern, path)}
        if len(set(matches.values())) > 1:
            raise ConfigError(
                f"the TP plan gives module {path!r} several styles ("
                + ", ".join(f"{p!r}: {s}" for p, s in matches.items())
                + "); make the model spec's tp_plan patterns unambiguous"
            )
        if matches:
            resolved[path] = next(iter(matches.values()))
    return resolved


#: styles that distribute the parameters of their own module, and of every module below it
OWN_PARAMETER_STYLES = frozenset({"colwise", "rowwise", "embedding", "output", "sequence_parallel", "replicate"})
SUBTREE_STYLES = frozenset({"moe"})


def uncovered_parameters(model: nn.Module, styles: Mapping[str, TPStyle], extra_covers: Iterable[str] = ()) -> list[str]:
    """The parameters of ``model`` that no entry of the plan distributes: applied as they
    are, they would stay plain tensors among DTensors and fail in the first step."""
    resolved = resolve_plan((name for name, _ in model.named_modules() if name), styles)
    extra_covers = tuple(extra_covers)
    uncovered = []
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        ancestors = [".".join(owner.split(".")[:end]) for end in range(1, owner.count(".") + 2)] if owner else []
        if resolved.get(owner) in OWN_PARAMETER_STYLES:
            continue
        if any(resolved.get(path) in SUBTREE_STYLES for path in ancestors):
            continue
        if owner and any(module_path_matches(pattern, owner) for pattern in extra_covers):
            continue
        uncovered.append(name)
    return uncovered


def build_style(
    style: TPStyle, options: StyleOptions, classes: Mapping[str, type[ParallelStyle]] | None = None
) -> ParallelStyle | None:
    """The torch style for one plan entry; None where nothing needs to change. ``classes``
    (the module's ``TP_STYLE_CLASSES``) replaces torch's class for a style name."""
    classes = classes or {}
    sp = options.sequence_parallel
    between_blocks = Shard(1) if sp else Replicate()
    if style == "colwise":
        return classes.get("colwise", ColwiseParallel)()
    if style == "rowwise":
        return classes.get("rowwise", RowwiseParallel)(output_layouts=between_blocks)
    if style == "embedding":
        return EmbeddingParallel(input_layouts=Replicate(), output_layouts=between_blocks)
    if style == "output":
        return ColwiseParallel(
            input_layouts=between_blocks,
            output_layouts=Shard(-1) if options.loss_parallel else Replicate(),
            use_local_output=not options.loss_parallel,
        )
    if style == "sequence_parallel":
        return SequenceParallel() if sp else ReplicatedParameters()
    if style == "replicate":
        return ReplicatedParameters()
    if style == "moe":
        return MixtureOfExpertsParallel(sequence_parallel=sp, expert_parallel=options.expert_parallel)
    if style == "sum_gradient":
        return SumInputGradient()
    if style == "prepare_input":
        # Only the first positional input is redistributed; keyword inputs (the RoPE
        # cache) are left alone. Without SP the input is already replicated.
        if not sp:
            return None
        return classes.get("prepare_input", PrepareModuleInput)(input_layouts=(Shard(1),),
                                                                desired_input_layouts=(Replicate(),))
    raise ConfigError(
        f"unknown tensor-parallel style {style!r} in the model's tp_plan; use one of: "
        + ", ".join(get_args(TPStyle))
    )


def apply_plan(
    model: nn.Module, tp_mesh: DeviceMesh, styles: Mapping[str, TPStyle], options: StyleOptions
) -> list[str]:
    """Parallelize ``model`` in place; returns the module paths that were given a style."""
    resolved = resolve_plan((name for name, _ in model.named_modules() if name), styles)
    plan = {}
    for path, style in resolved.items():
        classes = getattr(model.get_submodule(path), TP_STYLE_CLASSES, None)
        if (built := build_style(style, options, classes)) is not None:
            plan[path] = built
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return list(plan)
