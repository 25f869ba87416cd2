"""Cutting a model into pipeline stages that keep the full model's names.

A model is read as a sequence of *units*: its top-level modules in registration order,
with the block container (``model_spec.block_container``, an ``nn.ModuleDict``) expanded
into its blocks, e.g. ``tok_embeddings, layers.0, layers.1, norm, output`` for llama3.
Split points are units that begin a new stage. A stage is a copy of the model (on the meta
device, so copies are free) in which every unit of the other stages is gone: blocks are
deleted from the container, other top-level modules set to None. Parameter names
therefore stay those of the full model (``layers.3.attention.wq.weight``), and a
checkpoint loads under any split. The model's ``forward`` must run its units in
registration order and skip those that are None (the contract of a pipelineable model).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.model_spec import ModelSpec

    from plait_pipeline.config import PipelineConfig


@dataclass(frozen=True, slots=True)
class StagePlan:
    split_points: tuple[str, ...]
    """The units that begin stages 1..N-1."""
    stages_per_rank: int

    @property
    def num_stages(self) -> int:
        return len(self.split_points) + 1


def _block_container(model: nn.Module, model_spec: ModelSpec) -> nn.ModuleDict:
    container = getattr(model, model_spec.block_container, None)
    if not isinstance(container, nn.ModuleDict):
        raise ConfigError(
            f"model {model_spec.name!r} keeps its blocks in {model_spec.block_container!r} as "
            f"{type(container).__name__}, but pipelining needs an nn.ModuleDict there (deleting from a "
            "ModuleList renumbers the blocks, so parameter names would change with the split)"
        )
    return container


def stage_units(model: nn.Module, model_spec: ModelSpec) -> list[str]:
    """The model's units in the order its forward runs them."""
    container_name = model_spec.block_container
    blocks = _block_container(model, model_spec)
    units: list[str] = []
    for name, child in model.named_children():
        if name == container_name:
            units.extend(f"{container_name}.{key}" for key in blocks)
        elif child is not None:
            units.append(name)
    return units


def plan_stages(
    section: PipelineConfig,
    *,
    units: Sequence[str],
    pp: int,
    default_stages_per_rank: int,
    model_spec: ModelSpec,
    model_args: Any,
) -> StagePlan:
    """Where the stages begin, from (first found) ``--pipeline.split_points``,
    ``--pipeline.layers_per_stage`` or the model spec's split points for
    ``pp × stages_per_rank`` stages; checked against the units."""
    if section.split_points:
        split_points = tuple(section.split_points)
        source = "--pipeline.split_points"
    elif section.layers_per_stage:
        blocks = [unit for unit in units if unit.startswith(model_spec.block_container + ".")]
        per_stage = section.layers_per_stage
        if per_stage > len(blocks):
            raise ConfigError(
                f"--pipeline.layers_per_stage {per_stage} is more than the {len(blocks)} blocks of "
                f"{model_spec.name}: use at most {len(blocks)}"
            )
        split_points = tuple(blocks[index] for index in range(per_stage, len(blocks), per_stage))
        source = f"--pipeline.layers_per_stage {per_stage} ({len(blocks)} blocks)"
    else:
        if model_spec.pipeline_split_points is None:
            raise ConfigError(
                f"model {model_spec.name!r} declares no pipeline split points: pass "
                "--pipeline.split_points or --pipeline.layers_per_stage"
            )
        stages_per_rank = section.stages_per_rank or default_stages_per_rank
        split_points = tuple(model_spec.pipeline_split_points(model_args, pp * stages_per_rank))
        source = f"the model spec's split points for {pp * stages_per_rank} stages"

    num_stages = len(split_points) + 1
    if num_stages % pp:
        raise ConfigError(
            f"{source} give {num_stages} stages, which is not a multiple of --parallelism.pp {pp}: every "
            f"rank must hold the same number of stages"
        )
    stages_per_rank = num_stages // pp
    if section.stages_per_rank and section.stages_per_rank != stages_per_rank:
        raise ConfigError(
            f"--pipeline.stages_per_rank {section.stages_per_rank} disagrees with {source}, which give "
            f"{num_stages} stages = {stages_per_rank} per rank at pp {pp}: drop one of the two options"
        )
    check_split_points(split_points, units)
    return StagePlan(split_points=split_points, stages_per_rank=stages_per_rank)


def check_split_points(split_points: Sequence[str], units: Sequence[str]) -> None:
    position = {unit: index for index, unit in enumerate(units)}
    unknown = [point for point in split_points if point not in position]
    if unknown:
        raise ConfigError(
            f"pipeline split point {unknown[0]!r} is not a unit of the model; split points must be "
            f"among: {', '.join(units)}"
        )
    indices = [position[point] for point in split_points]
    if indices and indices[0] == 0:
        raise ConfigError(
            f"pipeline split point {split_points[0]!r} is the model's first unit, so stage 0 would be "
            "empty: split points name where stages 1, 2, ... begin"
        )
    if any(later <= earlier for earlier, later in zip(indices, indices[1:])):
        raise ConfigError(
            f"pipeline split points {', '.join(split_points)} are not in the model's order (or repeat "
            f"one): give them in the order {', '.join(units)}"
        )


def units_of_stages(units: Sequence[str], split_points: Sequence[str]) -> list[list[str]]:
    """The units of each stage."""
    starts = [0, *(list(units).index(point) for point in split_points), len(units)]
    return [list(units[start:end]) for start, end in zip(starts, starts[1:])]


def check_no_shared_parameters(model: nn.Module, stages: list[list[str]]) -> None:
    """A parameter used by units of two stages (tied embeddings) cannot be pipelined:
    each stage would train its own copy."""
    owner: dict[int, tuple[int, str]] = {}
    for stage_index, stage in enumerate(stages):
        for unit in stage:
            for name, parameter in model.get_submodule(unit).named_parameters(remove_duplicate=False):
                first = owner.setdefault(id(parameter), (stage_index, f"{unit}.{name}"))
                if first[0] != stage_index:
                    raise ConfigError(
                        f"{first[1]} (stage {first[0]}) and {unit}.{name} (stage {stage_index}) are one "
                        "shared parameter (tied weights), which pipeline stages cannot share: put both "
                        "modules on one stage (--pipeline.split_points) or untie them"
                    )


def build_stage_module(
    model: nn.Module, *, units: Sequence[str], keep: Sequence[str], model_spec: ModelSpec
) -> nn.Module:
    """A copy of ``model`` holding only the units in ``keep``."""
    stage = copy.deepcopy(model)
    blocks = _block_container(stage, model_spec)
    prefix = model_spec.block_container + "."
    for unit in units:
        if unit in keep:
            continue
        if unit.startswith(prefix):
            del blocks[unit[len(prefix):]]
        else:
            setattr(stage, unit, None)
    return stage


def describe_stages(stages: list[list[str]]) -> str:
    """``"0: tok_embeddings..layers.1 | 1: layers.2..output"`` for the log."""
    return " | ".join(
        f"{index}: {units[0]}" + (f"..{units[-1]}" if len(units) > 1 else "") for index, units in enumerate(stages)
    )

