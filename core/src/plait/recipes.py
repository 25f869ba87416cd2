"""Building blocks of the named recipes that model packages register (``plait.recipes``
entry points): each recipe is a plain function returning a ``JobConfig``; these set what
the recipes of every model share."""
from __future__ import annotations

from plait.config import JobConfig


def recipe(model: str, flavor: str, description: str) -> JobConfig:
    """The defaults, training ``model``/``flavor``."""
    config = JobConfig()
    config.model.name = model
    config.model.flavor = flavor
    config.job.description = description
    return config


def debug_recipe(model: str, flavor: str, description: str) -> JobConfig:
    """A debug flavor on the embedded corpus: a falling loss within minutes on a CPU."""
    config = recipe(model, flavor, description)
    config.training.steps = 50
    config.training.seq_len = 256
    config.training.local_batch_size = 8
    config.optimizer.lr = 8e-4
    config.lr_scheduler.warmup_steps = 5
    config.checkpoint.interval = 25
    return config


def pretraining_recipe(model: str, flavor: str, *, lr: float, steps: int, seq_len: int) -> JobConfig:
    """A published size on GPUs: bf16 with fp32 master weights, fused AdamW (weight decay
    0.1), 200 warmup steps then cosine decay to 10 %, clipping at 1, selective activation
    checkpointing, compiled blocks, one sequence per rank. The vocabulary is the published
    one (for the model's own tokenizer, --data.tokenizer), not the tokenizer's padded size."""
    config = recipe(model, flavor, f"{model} {flavor} pretraining")
    config.model.vocab = "flavor"
    config.training.seq_len = seq_len
    config.training.local_batch_size = 1
    config.training.steps = steps
    config.training.dtype = "bfloat16"
    config.training.max_norm = 1.0
    config.optimizer.lr = lr
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.implementation = "fused"
    config.lr_scheduler.warmup_steps = 200
    config.lr_scheduler.decay_type = "cosine"
    config.lr_scheduler.min_lr_factor = 0.1
    config.activation_checkpoint.mode = "selective"
    config.activation_checkpoint.selective_option = "op"
    config.compile.enable = True
    config.checkpoint.interval = 500
    config.metrics.log_freq = 10
    return config
