"""The typed config tree of a run.

Every section is a dataclass with defaults; the root ``JobConfig`` composes the core
sections, and ``plait.cli`` adds one field per enabled plugin's section (see
``plait_add_config_sections``). Each section validates itself (``validate()``) and
the components that consume a section build themselves from it.

Recipes (``config_registry.py`` in a model package) are functions returning a
``JobConfig``; command-line overrides (``--training.steps 20``) apply on top.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from plait.errors import ConfigError


#: Bounds past which a value can only produce non-finite weights (AdamW's update is about
#: lr per step; decoupled weight decay multiplies the weights by 1 - lr * weight_decay).
MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 1e3


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True, slots=True)
class JobSection:
    """Where the run writes and how its processes wait for each other."""

    dump_folder: str = "./outputs"
    """Folder for this run: resolved config, checkpoints, TensorBoard events."""
    description: str = ""
    """Free text describing the run; recorded in the resolved config.json."""
    pg_timeout_seconds: int = 300
    """Timeout of collectives; a rank that waits longer fails instead of hanging."""


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """Which model to build and where its initial weights come from."""

    name: str = ""
    """Registered model name, e.g. llama3 (set by --model or by the recipe)."""
    flavor: str = ""
    """Flavor of the model: its published size or a debug size. Empty: the shape of
    --model.hf_dir's checkpoint, else debugmodel."""
    hf_dir: str = ""
    """Initialize weights from this Hugging Face checkpoint folder (config.json + *.safetensors);
    the model's shape comes from its config.json."""
    args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model args' fields (--model.args.FIELD VALUE), e.g. {"n_layers": 4}."""
    vocab: Literal["tokenizer", "flavor"] = "tokenizer"
    """The vocabulary size of a model trained from scratch: the tokenizer's, padded to
    --model.vocab_multiple, or the flavor's (a published size, for its own tokenizer).
    Rows past the tokenizer's are masked out of the loss either way."""
    vocab_multiple: int = 128
    """Round the tokenizer's vocabulary size up to a multiple of this (efficient matmuls);
    1 keeps the exact size."""

    def validate(self) -> None:
        _require(self.vocab_multiple > 0, f"--model.vocab_multiple must be positive, got {self.vocab_multiple}")


@dataclass(kw_only=True, slots=True)
class TrainingSection:
    """Length of the run, batch shape and numerics."""

    steps: int = 10
    """Optimizer steps to train for: the run stops after step N (a resumed run too)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    local_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = local_batch_size * data-parallel degree.
    A multiple of that product gives gradient accumulation."""
    max_norm: float = 1.0
    """Gradient-norm clipping threshold; 0 disables clipping."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the model; master weights and optimizer state stay float32."""
    seed: int = 0
    """Random seed of the run (torch.manual_seed): weight initialization and other random draws."""
    deterministic: bool = False
    """Use deterministic algorithms (slower; bit-exact reruns on the same hardware)."""
    sample_interval: int = 0
    """Every N steps (and after the last), log greedy continuations of --training.sample_prompts
    to the console and TensorBoard (single process only); 0 disables it."""
    sample_prompts: tuple[str, ...] = ("The meaning of life is", "Once upon a time")
    """The prompts continued every --training.sample_interval steps."""
    sample_max_new_tokens: int = 16
    """Tokens generated per prompt every --training.sample_interval steps."""

    def validate(self) -> None:
        _require(self.steps > 0, f"--training.steps must be positive, got {self.steps}")
        _require(self.sample_interval >= 0, f"--training.sample_interval must be >= 0, got {self.sample_interval}")
        _require(not self.sample_interval or (self.sample_prompts and self.sample_max_new_tokens > 0),
                 "--training.sample_interval needs --training.sample_prompts and a positive "
                 "--training.sample_max_new_tokens")  # fmt: skip
        _require(self.seq_len > 0, f"--training.seq_len must be positive, got {self.seq_len}")
        _require(
            self.local_batch_size > 0,
            f"--training.local_batch_size must be positive, got {self.local_batch_size}",
        )
        _require(
            self.global_batch_size == -1 or self.global_batch_size > 0,
            f"--training.global_batch_size must be positive or -1, got {self.global_batch_size}",
        )
        _require(0 <= self.max_norm < math.inf, f"--training.max_norm must be finite and >= 0, got {self.max_norm}")


@dataclass(kw_only=True, slots=True)
class OptimizerSection:
    """The optimizer (AdamW); the learning rate follows --lr_scheduler.*."""

    name: Literal["AdamW"] = "AdamW"
    """Optimizer to use."""
    lr: float = 8e-4
    """Peak learning rate, reached at the end of warmup."""
    beta1: float = 0.9
    """Decay rate of the first-moment (gradient mean) estimate."""
    beta2: float = 0.95
    """Decay rate of the second-moment (squared gradient) estimate."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); 0 disables it."""
    implementation: Literal["for-loop", "foreach", "fused"] = "fused"
    """AdamW's implementation; ``fused`` falls back to ``foreach`` (with a log line) where
    torch has no fused kernel for the parameters' device or dtype."""

    def validate(self) -> None:
        _require(0 < self.lr <= MAX_LEARNING_RATE,
                 f"--optimizer.lr must be in (0, {MAX_LEARNING_RATE:g}], got {self.lr}: a larger (or infinite) "
                 "learning rate only produces non-finite weights")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--optimizer.beta1/beta2 must be in [0, 1)")
        _require(0 < self.eps < 1, f"--optimizer.eps must be in (0, 1), got {self.eps}")
        _require(0 <= self.weight_decay <= MAX_WEIGHT_DECAY,
                 f"--optimizer.weight_decay must be in [0, {MAX_WEIGHT_DECAY:g}], got {self.weight_decay}")


@dataclass(kw_only=True, slots=True)
class LRSchedulerSection:
    """Warmup-stable-decay: linear warmup, constant, then decay to min_lr_factor * lr."""

    warmup_steps: int = 2
    """Steps of linear warmup up to --optimizer.lr."""
    decay_ratio: float | None = None
    """Fraction of the steps spent decaying; None = decay over all steps after warmup."""
    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    """Shape of the decay phase."""
    min_lr_factor: float = 0.0
    """Learning rate at the end of the decay, as a fraction of --optimizer.lr."""

    def validate(self) -> None:
        _require(self.warmup_steps >= 0, "--lr_scheduler.warmup_steps must be >= 0")
        _require(
            self.decay_ratio is None or 0.0 <= self.decay_ratio <= 1.0,
            f"--lr_scheduler.decay_ratio must be in [0, 1], got {self.decay_ratio}",
        )
        _require(0.0 <= self.min_lr_factor <= 1.0, "--lr_scheduler.min_lr_factor must be in [0, 1]")


@dataclass(kw_only=True, slots=True)
class ParallelismSection:
    """Parallel degrees. Their product must equal the world size (dp_shard -1 fills)."""

    dp_replicate: int = 1
    """Data-parallel replicas (DDP, or HSDP with dp_shard > 1); needs the fsdp plugin when > 1."""
    dp_shard: int = -1
    """Ranks that shard parameters (FSDP); -1 = the ranks left by the other degrees."""
    cp: int = 1
    """Context-parallel degree: the sequence is split over this many ranks (context-parallel plugin)."""
    tp: int = 1
    """Tensor-parallel degree (tp plugin)."""
    pp: int = 1
    """Pipeline-parallel stages (pipeline plugin)."""
    ep: int = 1
    """Expert-parallel degree for MoE models (ep plugin)."""


@dataclass(kw_only=True, slots=True)
class ActivationCheckpointSection:
    """Recompute activations in backward instead of keeping them: less memory, more compute."""

    mode: Literal["none", "full", "selective"] = "none"
    """none keeps every activation; full recomputes each block; selective recomputes part."""
    selective_option: str = "op"
    """For selective: 'op' saves matmul/attention outputs and recomputes the rest;
    an integer N checkpoints every N-th block."""

    def validate(self) -> None:
        _require(
            self.selective_option == "op" or self.selective_option.isdigit(),
            f"--activation_checkpoint.selective_option must be 'op' or a positive integer, "
            f"got {self.selective_option!r}",
        )


@dataclass(kw_only=True, slots=True)
class CompileSection:
    """torch.compile of the model's blocks."""

    enable: bool = False
    """torch.compile each transformer block (and the loss)."""
    backend: str = "inductor"
    """torch.compile backend."""


@dataclass(kw_only=True, slots=True)
class DataSection:
    """Training text and tokenizer."""

    dataset: str = ""
    """Local .jsonl/.json/.parquet/.txt file(s) or folder, or an HF dataset name;
    empty = the embedded corpus (no network needed)."""
    dataset_config: str = ""
    """HF dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Field of each record that holds the text."""
    streaming: bool = True
    """Stream an HF dataset instead of downloading it whole first."""
    tokenizer: str = ""
    """Path to a tokenizer.json (or a folder holding one); empty = the embedded tokenizer."""
    bos_token: str = ""
    """The begin-of-text token placed before each document; empty = the tokenizer's own
    (tokenizer_config.json, special_tokens_map.json, or a usual name)."""
    eos_token: str = ""
    """The end-of-text token placed after each document; empty = the tokenizer's own."""
    mixture: tuple[str, ...] = ()
    """Several sources mixed by weight, instead of --data.dataset: each DATASET[@WEIGHT][#TEXT_FIELD]
    (a file, folder or HF dataset name; weight 1 and --data.text_field when omitted), e.g.
    --data.mixture ./web.jsonl@0.7 ./code.txt@0.3 'wiki@0.1#content'. Kinds may differ."""
    held_out_share: float = 0.0
    """Share of the documents (chosen by a hash of their text) that training never reads;
    validation reads them unless --validation.dataset names other data. 0 holds none out."""
    bad_rows: Literal["stop", "skip"] = "stop"
    """A malformed JSON-lines row (not JSON, not an object, no --data.text_field): stop
    names its file and line (after saving a checkpoint of the last finished step); skip
    skips it and counts it (logged, and data/bad_rows_skipped in the metrics)."""

    def validate(self) -> None:
        _require(0.0 <= self.held_out_share < 1.0,
                 f"--data.held_out_share must be in [0, 1), got {self.held_out_share}")
        _require(not (self.mixture and self.dataset),
                 "--data.mixture and --data.dataset both name the training data: pass one of them "
                 "(a mixture of one source is --data.mixture DATASET)")


@dataclass(kw_only=True, slots=True)
class ValidationSection:
    """Held-out loss and perplexity during training (see docs/evaluation.md)."""

    interval: int = 0
    """Validate every N optimizer steps (and after the last); 0 turns validation off."""
    steps: int = 4
    """Batches per validation pass; every pass reads the same ones."""
    local_batch_size: int = 0
    """Sequences per validation batch on each data-parallel rank; 0 = --training.local_batch_size."""
    dataset: str = ""
    """Held-out data, as --data.dataset takes it; empty = the --data.held_out_share of the training data."""
    dataset_config: str = ""
    """HF dataset configuration of --validation.dataset."""
    split: str = "train"
    """Split of --validation.dataset to read."""

    def validate(self) -> None:
        _require(self.interval >= 0, f"--validation.interval must be >= 0 (0 = off), got {self.interval}")
        _require(self.steps >= 1, f"--validation.steps must be >= 1, got {self.steps}")
        _require(self.local_batch_size >= 0,
                 f"--validation.local_batch_size must be >= 0 (0 = the training's), got {self.local_batch_size}")


@dataclass(kw_only=True, slots=True)
class CheckpointSection:
    """Saving and resuming (torch.distributed.checkpoint)."""

    enable: bool = True
    """Save checkpoints, and resume from the latest one in the folder if there is one."""
    folder: str = "checkpoint"
    """Relative to job.dump_folder."""
    interval: int = 500
    """Save every N steps (and at the last step)."""
    keep_latest_k: int = 3
    """Keep only the newest K checkpoints; 0 keeps all."""
    async_mode: Literal["disabled", "async"] = "disabled"
    """async writes checkpoints in the background while training continues."""
    load_step: int = -1
    """Resume from this step; -1 = the latest complete checkpoint."""
    newer_checkpoints: Literal["refuse", "move_aside"] = "refuse"
    """What --checkpoint.load_step does when the folder holds checkpoints newer than that
    step (training on from it would mix two histories): refuse, or move_aside (they move
    to <folder>/superseded/<time>/, kept but never resumed from)."""
    verify: bool = True
    """Check every tensor read when resuming against the checksum recorded when it was
    saved (a damaged file then stops the run, naming the checkpoint to fall back to);
    false skips the check, for very large checkpoints. Checksums are always recorded."""

    def validate(self) -> None:
        _require(self.interval > 0, f"--checkpoint.interval must be positive, got {self.interval}")
        _require(self.keep_latest_k >= 0, "--checkpoint.keep_latest_k must be >= 0 (0 keeps all)")


@dataclass(kw_only=True, slots=True)
class MetricsSection:
    """Console and TensorBoard metrics: loss, grad norm, tokens/s, TFLOPs, MFU, memory."""

    log_freq: int = 1
    """Log metrics every N steps."""
    enable_tensorboard: bool = True
    """Write TensorBoard events under job.dump_folder/metrics.tensorboard_folder."""
    tensorboard_folder: str = "tb"
    """Relative to job.dump_folder."""
    progress: Literal["auto", "on", "off"] = "auto"
    """A progress line with ETA; 'auto' shows it on a terminal."""

    def validate(self) -> None:
        _require(self.log_freq > 0, f"--metrics.log_freq must be positive, got {self.log_freq}")


@dataclass(kw_only=True, slots=True)
class ProfilingSection:
    """torch profiler traces of chosen steps (see docs/profiling.md). The schedule: skip
    ``skip_steps``, then ``repeat`` windows of ``wait_steps`` idle, ``warmup_steps``
    profiled but discarded, ``active_steps`` recorded."""

    enable: bool = False
    """Record profiler traces: one Chrome-trace JSON file per rank and window."""
    skip_steps: int = 1
    """Steps before the first window (the first step compiles and allocates)."""
    wait_steps: int = 0
    """Idle steps before each window."""
    warmup_steps: int = 1
    """Steps profiled and discarded before each window (the profiler's own start-up)."""
    active_steps: int = 2
    """Steps recorded in each window."""
    repeat: int = 1
    """Windows to record; 0 keeps recording windows until the run ends."""
    folder: str = "profiles"
    """Relative to job.dump_folder."""
    record_shapes: bool = True
    """Record the input shapes of each operator."""
    profile_memory: bool = False
    """Record tensor allocations and frees in the trace (every device, CPU included)."""
    with_stack: bool = False
    """Record Python stacks of each operator (large traces)."""
    memory_snapshot: bool = False
    """CUDA only: record the allocator's history and dump a snapshot after each window and
    when a step runs out of memory (open it at pytorch.org/memory_viz)."""

    def validate(self) -> None:
        for name in ("skip_steps", "wait_steps", "warmup_steps", "repeat"):
            value = getattr(self, name)
            _require(value >= 0, f"--profiling.{name} must be >= 0, got {value}")
        _require(self.active_steps >= 1, f"--profiling.active_steps must be >= 1, got {self.active_steps}")


@dataclass(kw_only=True, slots=True)
class MoESection:
    """Training options of mixture-of-experts layers; models without them ignore these."""

    load_balance_coeff: float = 0.0
    """Update rate of the expert biases that steer the top-k choice (aux-loss-free load
    balancing, DeepSeek-V3): after each step, bias += rate * sign(mean load - expert load).
    0 turns it off."""
    aux_loss_coeff: float = 0.0
    """Weight of the auxiliary load-balance loss (1.0 when balanced) in the training loss; 0 turns it off."""
    aux_loss_type: Literal["sequence", "batch"] = "sequence"
    """Balance loss per sequence (averaged) or over all tokens of a micro-batch."""

    def validate(self) -> None:
        _require(0 <= self.load_balance_coeff < math.inf,
                 f"--moe.load_balance_coeff must be finite and >= 0, got {self.load_balance_coeff}")
        _require(0 <= self.aux_loss_coeff < math.inf, f"--moe.aux_loss_coeff must be finite and >= 0, got {self.aux_loss_coeff}")


@dataclass(kw_only=True)
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    activation_checkpoint: ActivationCheckpointSection = field(default_factory=ActivationCheckpointSection)
    compile: CompileSection = field(default_factory=CompileSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    moe: MoESection = field(default_factory=MoESection)
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        for section in self.sections().values():
            check = getattr(section, "validate", None)
            if check is not None:
                check()
        _require(
            not self.validation.interval or self.validation.dataset or self.data.held_out_share > 0,
            f"--validation.interval {self.validation.interval} needs held-out data: name it with "
            "--validation.dataset, or hold out a share of the training data with --data.held_out_share "
            "(e.g. 0.01)",
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}
