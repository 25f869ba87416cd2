"""Small records the core hands to plugins through hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from plait.capabilities import CPU_CAPABILITIES, Capabilities

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.config import JobConfig
    from plait.parallel_dims import ParallelDims


@dataclass(kw_only=True, frozen=True)
class DeviceInfo:
    type: str
    """torch device type: "cpu", "cuda" (also ROCm builds of torch)."""
    backend: str
    """torch.distributed backend: "gloo", "nccl" (also on ROCm, where RCCL implements it), ..."""
    peak_flops: float
    """Peak dense FLOP/s of one device at the training dtype, for MFU (0: unknown)."""
    name: str = ""
    capabilities: Capabilities = field(default_factory=lambda: CPU_CAPABILITIES)
    """What the device can do (``plait.capabilities``); every feature gate asks it."""


@dataclass(kw_only=True, frozen=True)
class RunNeeds:
    """What a plugin declares about a run (hook ``plait_run_needs``), so that the core acts
    on it without knowing the plugin. The defaults ask for nothing."""

    sequence_splits: int = 1
    """The plugin cuts every sequence into this many equal parts (sequence parallelism:
    tp; load-balanced context parallelism: 2 × cp). --training.seq_len must be a multiple
    of the product over all plugins."""
    applies_compute_dtype: bool = False
    """The plugin runs the model in --training.dtype itself (FSDP's parameter dtype), so
    the core's autocast stays off."""
    compile_fullgraph: bool = True
    """False when the plugin puts modules inside a block that compiled code cannot trace
    (hooks of an FSDP unit inside the block): the core compiles blocks allowing graph breaks."""
    reason: str = ""
    """For messages: what the plugin does, e.g. "sequence parallelism over tp 2"."""
    requires: tuple[str, ...] = ()
    """Device capabilities this run needs with the plugin's options (names from
    ``plait.capabilities.CAPABILITY_NAMES``, e.g. "float8_matmul"). The core refuses the
    run up front, naming the plugin, the device and each missing capability."""
    requires_fix: str = ""
    """For that refusal: how to run without them, e.g. "drop --tp.async_tp"."""
    replica_groups: int = 1
    """The plugin runs this job as one of this many data-parallel replica groups, each a
    job of its own (torchft's fault-tolerant groups): every global batch is sharded over
    all of them (``ParallelDims.replica_groups``). At most one plugin may declare it."""
    replica_group: int = 0
    """This job's index among the replica groups, 0 .. replica_groups - 1."""
    job_folder: str = ""
    """Several jobs of one run share --job.dump_folder (torchft's replica groups): this
    job writes its own outputs (config record, metrics, TensorBoard, traces, samples) to
    ``<dump_folder>/<job_folder>``, while the checkpoints of the run stay in
    ``<dump_folder>/<checkpoint.folder>``, shared. At most one plugin may declare it."""
    writes_checkpoints: bool = True
    """False: another job of the run writes the persistent checkpoints into the shared
    checkpoint folder (torchft: replica group 0). This job resumes from them (its data
    loader from the checkpoint's stream position, which is the same for every shard, so
    it reads its own shard on) but never saves, locks or cleans the folder."""
    moe_group_alignment: int = 1
    """Every MoE layer pads each expert's group of rows to a multiple of this before its
    experts run, whatever the dispatcher (low-precision expert kernels quantize blocks of
    rows: 32 for mxfp8, 16 for float8). Plugins' alignments combine to their lcm."""

    @staticmethod
    def combine(needs: list[RunNeeds]) -> CombinedNeeds:
        splits = 1
        for need in needs:
            splits *= need.sequence_splits
        grouped = [need for need in needs if need.replica_groups > 1]
        if len(grouped) > 1:
            from plait.errors import ConfigError

            raise ConfigError(f"two plugins run this job as replica groups ({grouped[0].reason or '?'}; "
                              f"{grouped[1].reason or '?'}): enable only one of them")
        folders = [need for need in needs if need.job_folder]
        if len({need.job_folder for need in folders}) > 1:
            from plait.errors import ConfigError

            raise ConfigError(f"two plugins place this job's outputs in different folders ({folders[0].reason or '?'}: "
                              f"{folders[0].job_folder}; {folders[1].reason or '?'}: {folders[1].job_folder}): "
                              "enable only one of them")
        import math

        return CombinedNeeds(
            moe_group_alignment=math.lcm(1, *(need.moe_group_alignment for need in needs)),
            sequence_splits=splits,
            applies_compute_dtype=any(need.applies_compute_dtype for need in needs),
            compile_fullgraph=all(need.compile_fullgraph for need in needs),
            split_reasons=tuple(need.reason for need in needs if need.sequence_splits > 1 and need.reason),
            replica_groups=grouped[0].replica_groups if grouped else 1,
            replica_group=grouped[0].replica_group if grouped else 0,
            job_folder=folders[0].job_folder if folders else "",
            writes_checkpoints=all(need.writes_checkpoints for need in needs),
        )


@dataclass(kw_only=True, frozen=True)
class CombinedNeeds:
    """The needs of every enabled plugin for a run, combined."""

    sequence_splits: int = 1
    applies_compute_dtype: bool = False
    compile_fullgraph: bool = True
    split_reasons: tuple[str, ...] = ()
    replica_groups: int = 1
    replica_group: int = 0
    job_folder: str = ""
    writes_checkpoints: bool = True
    moe_group_alignment: int = 1


@dataclass(kw_only=True)
class PipelineResult:
    """What the pipeline plugin returns: this rank's model chunks and its schedule."""

    model_parts: list[nn.Module]
    schedule: Any
    has_first_stage: bool
    has_last_stage: bool
    stage_ids: list[int] = field(default_factory=list)
    """The stage index of each model part."""
    num_stages: int = 1
    microbatches: int = 1
    """Pipeline microbatches per micro-batch of the core."""
    microbatches_in_flight: int = 0
    """The most microbatches whose activations a rank holds at once under the schedule
    (0: all of them); ``plait plan`` sizes the activation memory with it."""


@dataclass(kw_only=True)
class StepContext:
    """The state of the current optimizer step, passed to the per-step hooks."""

    step: int
    config: JobConfig
    parallel_dims: ParallelDims
    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: current micro-batch (set before each forward/backward): tokens, or a model's own
    #: named inputs (``plait.data.batch.TensorBatch``) when its spec has a data pipeline
    inputs: Any = None
    labels: torch.Tensor | None = None
    #: the loss of each micro-batch is divided by this (gradient accumulation)
    grad_accumulation_steps: int = 1
    #: index of the current micro-batch in this step, 0 .. grad_accumulation_steps - 1
    micro_batch_index: int = 0
    #: what the plugins declared for this run, combined (``plait_run_needs``)
    needs: CombinedNeeds = field(default_factory=lambda: CombinedNeeds())
    pipeline: PipelineResult | None = None
    #: yields (inputs, labels) micro-batches already on the device
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the plugin manager's hook relay, for hooks called inside the step
    hook: Any = None
    #: the run's ``CheckpointManager``: what a checkpoint holds (``model_parts``,
    #: ``optimizer``, ``lr_scheduler`` and ``states``: data loader, train state, plugins'
    #: states). A plugin that loads a live state inside ``plait_train_step`` (torchft's
    #: healing from a peer) reads and loads it through this, then sets ``step`` to the
    #: step it trains: the loop continues from there.
    checkpointer: Any = None
    #: filled by the step: summed loss, grad norm, ...; hooks may add scalars to log under
    #: "metrics" (console and TensorBoard) and "metric_details" (TensorBoard only)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def is_last_micro_batch(self) -> bool:
        return self.micro_batch_index == self.grad_accumulation_steps - 1
