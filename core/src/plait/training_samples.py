"""Greedy continuations of fixed prompts during training (``--training.sample_interval``).

Runs between steps in eval mode under ``inference_mode``: greedy decoding draws no random
numbers and nothing of the training state changes, so the training losses are the same,
bit for bit, with and without it. Only a model that is whole on one process can generate;
a sharded or pipelined layout is refused before training starts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from plait.config import JobConfig
from plait.data.tokenizer import Tokenizer
from plait.errors import ConfigError
from plait.generation import generate


def _check_layout(config: JobConfig, *, world_size: int) -> None:
    """Refuse sampling where the model is not whole on one process."""
    if world_size > 1:
        p = config.parallelism
        layout = ", ".join(f"{name} {value}" for name, value in (("dp_replicate", p.dp_replicate), ("dp_shard",
                           p.dp_shard), ("tp", p.tp), ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if value != 1)
        raise ConfigError(
            f"--training.sample_interval needs the whole model on one process, but this run has {world_size} "
            f"ranks ({layout or 'dp_shard -1'}); drop it and sample from a checkpoint with `plait generate`"
        )


class TrainingSamples:
    """``max_len``: the longest sequence the model takes (None: no limit)."""

    def __init__(self, config: JobConfig, tokenizer: Tokenizer, *, device: torch.device, world_size: int,
                 max_len: int | None) -> None:  # fmt: skip
        _check_layout(config, world_size=world_size)
        training = config.training
        for prompt in training.sample_prompts:
            length = 1 + len(tokenizer.encode(prompt)) + training.sample_max_new_tokens
            if max_len is not None and length > max_len:
                raise ConfigError(
                    f"--training.sample_prompts {prompt!r} plus --training.sample_max_new_tokens "
                    f"{training.sample_max_new_tokens} make {length} tokens, more than the model's {max_len} "
                    "(--training.seq_len): shorten the prompt or lower --training.sample_max_new_tokens"
                )
        self.interval = training.sample_interval
        self.prompts: Sequence[str] = training.sample_prompts
        self.max_new_tokens = training.sample_max_new_tokens
        self.tokenizer = tokenizer
        self.device = device

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    def run(self, model: nn.Module) -> list[tuple[str, str]]:
        """(prompt, continuation) for each prompt, generated one prompt at a time."""
        was_training = model.training
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"):  # compiled blocks run as written: no recompilation
                samples = [self._continue(model, prompt) for prompt in self.prompts]
        finally:
            model.train(was_training)
        return samples

    def _continue(self, model: nn.Module, prompt: str) -> tuple[str, str]:
        ids = torch.tensor([[self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]], device=self.device)
        out = generate(model, ids, max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                       vocab_size=self.tokenizer.vocab_size)  # fmt: skip
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != self.tokenizer.eos_id]
        return prompt, self.tokenizer.decode(new)
