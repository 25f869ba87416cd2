"""The pipeline plugin's checks before any work starts: one ConfigError per mistake, which
says what is wrong and how to fix it."""
from __future__ import annotations

import dataclasses

import pytest

from plait.config import JobConfig
from plait.errors import ConfigError
from plait.parallel_dims import ParallelDims
from plait.testing import check_plugins
from plait_llama3.spec import FLAVORS, llama3_spec
from plait_pipeline import plugin
from plait_pipeline.config import SCHEDULE_NAMES, PipelineConfig

SPEC = llama3_spec()


def job(*, flavor: str = "debugmodel_tiny4", local_batch_size: int = 4, compile: bool = False, **pipeline) -> JobConfig:
    config = JobConfig()
    config.model.flavor = flavor
    config.training.local_batch_size = local_batch_size
    config.compile.enable = compile
    config.pipeline = PipelineConfig(**pipeline)
    return config


def validate(config: JobConfig, *, pp: int = 2, spec=SPEC) -> None:
    config.pipeline.validate()
    check_plugins(plugin, config=config, parallel_dims=ParallelDims(pp=pp, world_size=pp), model_spec=spec)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_schedule_is_accepted_with_its_defaults(schedule):
    validate(job(schedule=schedule))


def test_options_without_pipeline_parallelism_are_refused():
    validate(job(), pp=1)  # defaults: nothing to say
    with pytest.raises(ConfigError, match="--pipeline.schedule only applies with pipeline parallelism"):
        validate(job(schedule="GPipe"), pp=1)


@pytest.mark.parametrize(
    ("options", "pp", "message"),
    [
        ({"schedule": "Zigzag"}, 2, "'Zigzag' is not a known schedule; choose one of: GPipe, 1F1B"),
        ({"microbatches": -1}, 2, "--pipeline.microbatches must be >= 0"),
        ({"split_points": ("layers.2",), "layers_per_stage": 2}, 2, "pass only one of them"),
        ({"microbatches": 3}, 2, "--pipeline.microbatches 3 does not divide --training.local_batch_size 4.*1, 2, 4"),
        ({"microbatches": 1}, 2, "1F1B needs at least as many microbatches as stages"),
        ({"schedule": "DualPipeV", "microbatches": 2}, 2, "DualPipeV needs at least as many microbatches as stages .4."),
        ({"schedule": "Interleaved1F1B", "microbatches": 5, "local_batch_size": 10}, 2,
         "runs 5 microbatches in microbatches // pp = 2 rounds, which must divide them"),
        ({"schedule": "InterleavedZeroBubble", "microbatches": 7, "local_batch_size": 7}, 2,
         "= 3 rounds.*--pipeline.microbatches 6"),
        ({"schedule": "Interleaved1F1B", "stages_per_rank": 1}, 2, "set --pipeline.stages_per_rank 2"),
        ({"schedule": "LoopedBFS", "split_points": ("layers.2",)}, 2, "interleaves several stages per rank"),
        ({"schedule": "GPipe", "stages_per_rank": 2}, 2, "runs one stage per rank"),
        ({"schedule": "ZBVZeroBubble", "layers_per_stage": 1, "stages_per_rank": 0}, 4, "exactly 2 stages per rank"),
        ({"flavor": "debugmodel_tiny"}, 4, "cannot split 2 layers into 4 pipeline stages"),
        ({"schedule": "ZBVZeroBubble", "compile": True}, 2, "not support with compiled modules: drop --compile.enable"),
    ],
)
def test_invalid_options(options, pp, message):
    options = dict(options)
    config = job(
        flavor=options.pop("flavor", "debugmodel_tiny4"),
        local_batch_size=options.pop("local_batch_size", 4),
        compile=options.pop("compile", False),
        **options,
    )
    with pytest.raises(ConfigError, match=message):
        validate(config, pp=pp)


def test_tied_embeddings_cannot_be_pipelined():
    tied = dataclasses.replace(FLAVORS["debugmodel_tiny4"], tie_word_embeddings=True)
    spec = dataclasses.replace(SPEC, flavors={"tied": tied})
    with pytest.raises(ConfigError, match="tied embeddings"):  # the spec's own split points refuse it
        validate(job(flavor="tied"), spec=spec)
    with pytest.raises(ConfigError, match="shared parameter"):  # so does an explicit split
        validate(job(flavor="tied", split_points=("layers.2",)), spec=spec)


def test_compile_is_accepted_with_schedules_that_run_full_backward():
    validate(job(schedule="Interleaved1F1B", compile=True))


@pytest.mark.parametrize(
    ("schedule", "microbatches"),
    [("Interleaved1F1B", 3), ("Interleaved1F1B", 6), ("InterleavedZeroBubble", 8), ("GPipe", 1), ("1F1B", 2),
     ("DualPipeV", 4), ("ZBVZeroBubble", 1), ("LoopedBFS", 5)],
)
def test_microbatch_counts_torch_accepts(schedule, microbatches):
    """Measured on torch 2.13 at pp 2 (2 stages per rank for the multi-stage schedules)."""
    validate(job(schedule=schedule, microbatches=microbatches, local_batch_size=microbatches))


def test_validation_batches_must_have_the_training_shape():
    config = job()
    config.validation.interval, config.validation.local_batch_size = 2, 2
    with pytest.raises(ConfigError, match="--validation.local_batch_size 2: under pipeline parallelism"):
        validate(config)
    config.validation.local_batch_size = 0
    validate(config)
