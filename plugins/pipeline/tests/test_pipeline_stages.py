"""Cutting a model into stages (no process group needed): units, split plans, stage
modules that keep the full model's names and compose to the full model, and which
stages each rank holds under each schedule layout."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from plait.errors import ConfigError
from plait_llama3.spec import FLAVORS, llama3_spec
from plait_pipeline.config import PipelineConfig
from plait_pipeline.schedules import StageLayout, loss_owner, stage_indices
from plait_pipeline.stages import (
    build_stage_module,
    check_no_shared_parameters,
    plan_stages,
    stage_units,
    units_of_stages,
)

SPEC = llama3_spec()
TINY4 = FLAVORS["debugmodel_tiny4"]


def meta_model(args=TINY4) -> nn.Module:
    with torch.device("meta"):
        return SPEC.build(args)


def plan(section: PipelineConfig, *, pp: int = 2, default_stages_per_rank: int = 1, args=TINY4):
    return plan_stages(
        section,
        units=stage_units(meta_model(args), SPEC),
        pp=pp,
        default_stages_per_rank=default_stages_per_rank,
        model_spec=SPEC,
        model_args=args,
    )


def test_units_are_top_level_modules_with_blocks_expanded_in_forward_order():
    assert stage_units(meta_model(), SPEC) == [
        "tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "output",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "pp", "default_stages_per_rank", "split_points", "stages_per_rank"),
    [
        (PipelineConfig(), 2, 1, ("layers.2",), 1),
        (PipelineConfig(), 2, 2, ("layers.1", "layers.2", "layers.3"), 2),
        (PipelineConfig(stages_per_rank=2), 2, 1, ("layers.1", "layers.2", "layers.3"), 2),
        (PipelineConfig(layers_per_stage=1), 2, 1, ("layers.1", "layers.2", "layers.3"), 2),
        (PipelineConfig(layers_per_stage=2), 2, 1, ("layers.2",), 1),
        (PipelineConfig(layers_per_stage=3), 2, 1, ("layers.3",), 1),  # the last stage takes the rest
        (PipelineConfig(split_points=("layers.1",)), 2, 2, ("layers.1",), 1),
        (PipelineConfig(split_points=("layers.0", "layers.2", "norm")), 2, 1, ("layers.0", "layers.2", "norm"), 2),
    ],
)
def test_plan_sources(section, pp, default_stages_per_rank, split_points, stages_per_rank):
    result = plan(section, pp=pp, default_stages_per_rank=default_stages_per_rank)
    assert (result.split_points, result.stages_per_rank) == (split_points, stages_per_rank)
    assert result.num_stages == len(split_points) + 1


@pytest.mark.parametrize(
    ("section", "pp", "message"),
    [
        (PipelineConfig(split_points=("layers.9",)), 2, "'layers.9' is not a unit of the model"),
        (PipelineConfig(split_points=("tok_embeddings",)), 2, "stage 0 would be empty"),
        (PipelineConfig(split_points=("layers.3", "layers.1", "norm")), 2, "not in the model's order"),
        (PipelineConfig(split_points=("layers.1", "layers.1", "norm")), 2, "not in the model's order"),
        (PipelineConfig(split_points=("layers.1", "layers.2")), 2, "3 stages, which is not a multiple"),
        (PipelineConfig(layers_per_stage=1), 3, r"\(4 blocks\) give 4 stages, which is not a multiple of .*pp 3"),
        (PipelineConfig(layers_per_stage=5), 2, "more than the 4 blocks"),
        (PipelineConfig(split_points=("layers.2",), stages_per_rank=2), 2, "disagrees with --pipeline.split_points"),
        (PipelineConfig(), 8, "cannot split 4 layers into 8"),
    ],
)
def test_plan_errors(section, pp, message):
    with pytest.raises(ConfigError, match=message):
        plan(section, pp=pp)


def test_a_spec_without_split_points_needs_explicit_ones():
    spec = dataclasses.replace(SPEC, pipeline_split_points=None)
    units = stage_units(meta_model(), spec)
    with pytest.raises(ConfigError, match="declares no pipeline split points"):
        plan_stages(PipelineConfig(), units=units, pp=2, default_stages_per_rank=1, model_spec=spec, model_args=TINY4)
    explicit = plan_stages(
        PipelineConfig(layers_per_stage=2), units=units, pp=2, default_stages_per_rank=1, model_spec=spec,
        model_args=TINY4,
    )  # fmt: skip
    assert explicit.split_points == ("layers.2",)


def test_blocks_in_a_module_list_are_refused():
    class ListModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    with pytest.raises(ConfigError, match="needs an nn.ModuleDict"):
        stage_units(ListModel(), SPEC)


def test_tied_weights_across_stages_are_refused():
    tied = meta_model(dataclasses.replace(TINY4, tie_word_embeddings=True))
    units = stage_units(tied, SPEC)
    with pytest.raises(ConfigError, match="tok_embeddings.weight .stage 0. and output.weight .stage 1."):
        check_no_shared_parameters(tied, units_of_stages(units, ["layers.2"]))
    check_no_shared_parameters(meta_model(), units_of_stages(units, ["layers.2"]))  # untied: fine


def test_stages_keep_full_names_and_compose_to_the_full_model():
    torch.manual_seed(0)
    full = SPEC.build(TINY4)
    with torch.no_grad():
        full.init_weights()
    units = stage_units(full, SPEC)
    split = ["layers.1", "layers.3", "norm"]  # uneven, and a stage without blocks
    parts = [
        build_stage_module(full, units=units, keep=keep, model_spec=SPEC) for keep in units_of_stages(units, split)
    ]

    names = [set(part.state_dict()) for part in parts]
    assert set().union(*names) == set(full.state_dict())
    assert sum(len(n) for n in names) == len(full.state_dict())  # disjoint
    assert "layers.3.attention.wq.weight" in names[2] and "output.weight" in names[3]
    assert list(parts[3].layers) == [] and parts[3].tok_embeddings is None

    tokens = torch.randint(0, TINY4.vocab_size, (2, 12))
    hidden = tokens
    for part in parts:
        hidden = part(hidden)
    torch.testing.assert_close(hidden, full(tokens))


@pytest.mark.parametrize(
    ("layout", "stages_per_rank", "by_rank", "owner"),
    [
        (StageLayout.SINGLE, 1, [[0], [1], [2], [3]], 3),
        (StageLayout.LOOPED, 2, [[0, 4], [1, 5], [2, 6], [3, 7]], 3),
        (StageLayout.LOOPED, 3, [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]], 3),
        (StageLayout.V, 2, [[0, 7], [1, 6], [2, 5], [3, 4]], 0),
    ],
)
def test_stage_indices_by_layout(layout, stages_per_rank, by_rank, owner):
    pp = 4
    assert [stage_indices(layout, pp_rank=r, pp=pp, stages_per_rank=stages_per_rank) for r in range(pp)] == by_rank
    assert loss_owner(layout, pp=pp, stages_per_rank=stages_per_rank) == owner
