"""The generator: samples groups of completions with the plait model (the trainer's model
class, ``plait.generate`` with its KV cache, batched, left-padded prompts), recomputes the
sampling policy's log-probabilities on the trainer's micro-batch chunks, and scores them.

A generator backend is anything with ``rollout(index, version) -> Rollout`` and a model
whose weights ``SharedWeights.pull`` can load; on GPUs an inference engine (vLLM) would
be such a backend (README).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from plait.generation import generate
from plait_rl.config import RLSection
from plait_rl.logprobs import completion_logprobs
from plait_rl.rollout import Rollout
from plait_rl.tasks import DigitTask


@dataclass(kw_only=True)
class GeneratorSetup:
    """Everything a generator process needs to build itself (picklable)."""

    model_name: str
    model_args: Any
    tokenizer: str
    bos_token: str
    eos_token: str
    rl: RLSection
    prompts_per_batch: int
    micro_batch_rows: int
    """The trainer's micro-batch size: log-probabilities are computed on chunks of this many rows."""
    prompt_width: int = 0
    """Columns every prompt is left-padded to (fixed shapes; sequence parallelism needs an
    input length it divides); 0 = the batch's longest prompt."""
    first_index: int = 0
    """The batch index of the run's first step (a resumed run starts later)."""

    @property
    def task(self) -> DigitTask:
        return DigitTask(self.rl.task, self.rl.digits)

    def build_model(self) -> nn.Module:
        from plait.plugins import load_model_spec

        spec = load_model_spec(self.model_name)
        model = spec.build_meta(self.model_args)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights()  # buffers outside the state dict (RoPE tables); weights come from the trainer
        return model.eval()

    def build_tokenizer(self) -> Any:
        from plait.data import build_tokenizer

        return build_tokenizer(self.tokenizer, bos_token=self.bos_token, eos_token=self.eos_token)


class Generator:
    def __init__(self, setup: GeneratorSetup, model: nn.Module, *, reference: nn.Module | None = None,
                 tokenizer: Any = None) -> None:  # fmt: skip
        self.setup = setup
        self.model = model
        self.reference = reference
        self.tokenizer = tokenizer if tokenizer is not None else setup.build_tokenizer()

    def prompts(self, index: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The answers, left-padded prompt ids and their mask of batch ``index``, each
        prompt repeated ``group_size`` times."""
        rl, tokenizer = self.setup.rl, self.tokenizer
        problems = self.setup.task.problems(self.setup.prompts_per_batch, seed=rl.seed * 1_000_003 + index)
        encoded = [[tokenizer.bos_id, *tokenizer.encode(problem.prompt)] for problem in problems]
        width = max(self.setup.prompt_width, *map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, prompt in enumerate(encoded):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        answers = [problem.answer for problem in problems for _ in range(rl.group_size)]
        return answers, ids.repeat_interleave(rl.group_size, 0), mask.repeat_interleave(rl.group_size, 0)

    def rollout(self, index: int, version: int) -> Rollout:
        rl, tokenizer = self.setup.rl, self.tokenizer
        answers, prompt_ids, prompt_mask = self.prompts(index)
        prompt_len = prompt_ids.shape[1]
        start = time.perf_counter()
        sampled = generate(self.model, prompt_ids, attention_mask=prompt_mask, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature, seed=rl.seed * 1_000_003 + index, eos_token_id=tokenizer.eos_id,
                           vocab_size=tokenizer.vocab_size)  # fmt: skip
        tokens = torch.full((sampled.shape[0], prompt_len + rl.max_new_tokens), tokenizer.eos_id, dtype=torch.long)
        tokens[:, : sampled.shape[1]] = sampled
        completion = tokens[:, prompt_len:]
        completion_mask = completion_mask_of(completion, tokenizer.eos_id)
        logprobs = self.logprobs(self.model, tokens, prompt_mask)
        ref_logprobs = self.logprobs(self.reference, tokens, prompt_mask) if self.reference is not None else None
        seconds = time.perf_counter() - start
        texts = [tokenizer.decode(row[mask.bool()].tolist()).replace(_eos_text(tokenizer), "")
                 for row, mask in zip(completion, completion_mask)]  # fmt: skip
        rewards = torch.tensor([DigitTask.reward(text, answer) for text, answer in zip(texts, answers)])
        return Rollout(index=index, version=version, tokens=tokens, prompt_mask=prompt_mask,
                       completion_mask=completion_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, rewards=rewards,
                       generation_seconds=seconds, completions=texts)  # fmt: skip

    def logprobs(self, model: nn.Module, tokens: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The policy's log-probabilities, chunk by chunk as the trainer's micro-batches hold the rows."""
        rows = self.setup.micro_batch_rows
        with torch.no_grad():
            return torch.cat([
                completion_logprobs(model, tokens[start : start + rows], prompt_mask=prompt_mask[start : start + rows],
                                    temperature=self.setup.rl.temperature, vocab_size=self.tokenizer.vocab_size)
                for start in range(0, tokens.shape[0], rows)
            ])  # fmt: skip


def completion_mask_of(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[N, L] 1 on each completion's tokens up to and including its first end-of-text token."""
    is_eos = (completion == eos_id).long()
    ended_before = is_eos.cumsum(dim=1) - is_eos
    return (ended_before == 0).long()


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.decode([tokenizer.eos_id])
