"""One RL run on plait's trainer: what the rl plugin's hooks do at each step."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.errors import ConfigError, PlaitError
from plait_rl.generator import GeneratorSetup
from plait_rl.logprobs import completion_logprobs
from plait_rl.losses import group_advantages, groups_with_spread, policy_loss, token_weights
from plait_rl.rollout import Rollout, training_micro_batches
from plait_rl.stream import RolloutStream
from plait_rl.weights import full_state_dict

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext

def check_run(config: JobConfig, parallel_dims: ParallelDims, spec: ModelSpec, job: Job) -> None:
    """Refuse, before any work, what the loop cannot run, with the fix."""
    rl = config.rl
    rl.validate()
    if not spec.token_inputs:
        raise ConfigError(f"the rl plugin trains language models; model {spec.name!r} takes no tokens")
    for degree, why in (("pp", "the policy loss runs in plait_forward_backward, which a pipeline schedule replaces"),
                        ("cp", "the policy loss needs every position of a completion on one rank")):
        if getattr(parallel_dims, degree) > 1:
            raise ConfigError(f"--parallelism.{degree} {getattr(parallel_dims, degree)} cannot run with the rl plugin "
                              f"({why}): use --parallelism.{degree} 1")  # fmt: skip
    rows = config.training.local_batch_size * parallel_dims.dp_degree * job.grad_accumulation_steps
    if rows % rl.group_size:
        raise ConfigError(
            f"a step trains on {rows} completions (--training.local_batch_size {config.training.local_batch_size} × "
            f"data-parallel degree {parallel_dims.dp_degree} × accumulation {job.grad_accumulation_steps}), which "
            f"must be a multiple of --rl.group_size {rl.group_size}: e.g. --training.local_batch_size {rl.group_size}"
        )
    longest = prompt_width(config, job.needs.sequence_splits) + rl.max_new_tokens
    if longest > config.training.seq_len:
        raise ConfigError(f"a prompt and its completion take up to {longest} tokens, more than --training.seq_len "
                          f"{config.training.seq_len} (the model's positions): use --training.seq_len {longest}, or "
                          "lower --rl.max_new_tokens or --rl.digits")  # fmt: skip


def prompt_width(config: JobConfig, sequence_splits: int) -> int:
    """The columns every prompt is left-padded to: an upper bound of its tokens (every
    character of the longest prompt a token, plus the begin-of-text token), rounded up so
    that the model's input (prompt and completion but the last token) splits into
    ``sequence_splits`` equal parts (sequence parallelism shards it)."""
    rl = config.rl
    number = "9" * rl.digits
    prompt = f"add {number} + {number} =" if rl.task == "add" else f"{rl.task} {number} ="
    width = 1 + len(prompt)
    return width + (-(width + rl.max_new_tokens - 1)) % sequence_splits


class RLRun:
    def __init__(self, job: Job) -> None:
        from plait.data import build_tokenizer

        config = job.config
        self.job = job
        self.rl = config.rl
        self.parallel_dims = job.parallel_dims
        self.rows = config.training.local_batch_size
        self.accumulation = job.grad_accumulation_steps
        self.batch_rows = self.rows * self.parallel_dims.dp_degree * self.accumulation
        self.vocab_size = build_tokenizer(config.data.tokenizer, bos_token=config.data.bos_token,
                                          eos_token=config.data.eos_token).vocab_size  # fmt: skip
        self.stream: RolloutStream | None = None
        self.started = False
        self._sums: dict[str, torch.Tensor] = {}
        self._maxima: torch.Tensor | None = None
        self._device = torch.device("cpu")
        self._rollout_metrics: dict[str, float] = {}

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def setup(self, first_index: int) -> GeneratorSetup:
        data = self.job.config.data
        return GeneratorSetup(model_name=self.job.spec.name, model_args=self.job.model_args, tokenizer=data.tokenizer,
                              bos_token=data.bos_token, eos_token=data.eos_token, rl=self.rl,
                              prompts_per_batch=self.batch_rows // self.rl.group_size, micro_batch_rows=self.rows,
                              prompt_width=prompt_width(self.job.config, self.job.needs.sequence_splits),
                              first_index=first_index)  # fmt: skip

    # -------------------------------------------------------------------- the step

    def before_step(self, ctx: StepContext) -> None:
        index = ctx.step - 1
        if not self.started:
            state = full_state_dict(ctx.model_parts[0])  # every rank: sharded weights are gathered
            if self.rank == 0:
                self.stream = RolloutStream(self.setup(index), state)
            self.started = True
        rollout = self._receive(index)
        lag = index - rollout.version
        if not 0 <= lag <= self.rl.max_policy_lag:
            raise PlaitError(f"step {ctx.step} received a rollout of policy version {rollout.version}, {lag} versions "
                             f"behind (--rl.max_policy_lag {self.rl.max_policy_lag})")  # fmt: skip
        advantages = group_advantages(rollout.rewards, self.rl.group_size, scaling=self.rl.advantage_scaling)
        keep = groups_with_spread(rollout.rewards, self.rl.group_size) if self.rl.filter_equal_groups else None
        weights = token_weights(rollout.completion_mask, normalization=self.rl.normalization,
                                max_new_tokens=self.rl.max_new_tokens, keep=keep)  # fmt: skip
        device = next(ctx.model_parts[0].parameters()).device
        batches = training_micro_batches(rollout, advantages=advantages, weights=weights, rows=self.rows,
                                         dp_rank=self.parallel_dims.dp_rank(), dp_degree=self.parallel_dims.dp_degree,
                                         accumulation=self.accumulation, device=device)  # fmt: skip
        ctx.batches = iter(batches)
        self._sums, self._maxima, self._device = {}, None, device
        self._rollout_metrics = rollout_metrics(rollout, advantages, lag=lag, kept=keep)

    def _receive(self, index: int) -> Rollout:
        """Rank 0 takes the rollout from the stream; every other rank receives it from rank 0."""
        rollout = self.stream.get(index) if self.stream is not None else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            holder = [rollout]
            dist.broadcast_object_list(holder, src=0)
            rollout = holder[0]
        assert rollout is not None
        return rollout

    def forward_backward(self, ctx: StepContext) -> torch.Tensor:
        batch = ctx.inputs
        logprobs = completion_logprobs(ctx.model_parts[0], batch["tokens"], prompt_mask=batch["prompt_mask"],
                                       temperature=self.rl.temperature, vocab_size=self.vocab_size)  # fmt: skip
        result = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["weights"],
                             clip_low=self.rl.clip_low, clip_high=self.rl.upper_clip,
                             ref_logprobs=batch.get("ref_logprobs"), kl_coef=self.rl.kl_coef)  # fmt: skip
        # the weights hold the whole batch's normalization; data parallelism averages gradients over its ranks
        loss = result.loss * self.parallel_dims.dp_degree
        loss.backward()
        mask = batch["completion_mask"].bool()
        ratios = result.ratio[mask]
        for name, value in (("tokens", mask.sum()), ("ratio", ratios.sum()), ("clipped", result.clipped[mask].sum()),
                            ("kl", result.kl[mask].sum())):  # fmt: skip
            self._sums[name] = self._sums[name] + value.double() if name in self._sums else value.double()
        if ratios.numel():  # the largest ratio, and the smallest as the largest of its negation
            extremes = torch.stack([ratios.max(), -ratios.min()]).double()
            self._maxima = extremes if self._maxima is None else torch.maximum(self._maxima, extremes)
        return loss.detach()

    def after_step(self, ctx: StepContext) -> None:
        state = full_state_dict(ctx.model_parts[0])
        if self.stream is not None:
            self.stream.publish(state, version=ctx.step)
        sums, maxima = self._reduced()
        tokens = max(float(sums[0]), 1.0)
        metrics = dict(self._rollout_metrics)
        metrics.update({"rl/clip_fraction": float(sums[2]) / tokens, "rl/kl": float(sums[3]) / tokens})
        details = {"rl/ratio_mean": float(sums[1]) / tokens, "rl/ratio_max": float(maxima[0]),
                   "rl/ratio_min": -float(maxima[1])}  # fmt: skip
        console = ("rl/reward", "rl/clip_fraction", "rl/kl", "rl/policy_lag", "rl/generation_tokens_per_s")
        ctx.results.setdefault("metrics", {}).update({name: metrics[name] for name in console})
        ctx.results.setdefault("metric_details", {}).update(
            {**{name: value for name, value in metrics.items() if name not in console}, **details})

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's token count, ratio, clipped and KL sums, summed over the data-parallel
        ranks, and the ratio's (max, -min), their maxima."""
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        sums = torch.stack([self._sums.get(name, zero) for name in ("tokens", "ratio", "clipped", "kl")])
        maxima = self._maxima if self._maxima is not None else zero.new_tensor([1.0, -1.0])
        mesh = self.parallel_dims.get_optional_mesh("dp_cp")
        if mesh is not None:
            dist.all_reduce(sums, group=mesh.get_group())
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return sums, maxima

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def rollout_metrics(rollout: Rollout, advantages: torch.Tensor, *, lag: int,
                    kept: torch.Tensor | None) -> dict[str, float]:  # fmt: skip
    lengths = rollout.completion_mask.sum(dim=1).float()
    metrics = {
        "rl/reward": float(rollout.rewards.mean()),
        "rl/reward_std": float(rollout.rewards.std()),
        "rl/exact_share": float((rollout.rewards == 1).float().mean()),
        "rl/advantage_mean": float(advantages.mean()),
        "rl/advantage_std": float(advantages.std()),
        "rl/advantage_abs_max": float(advantages.abs().max()),
        "rl/completion_tokens": float(lengths.mean()),
        "rl/policy_lag": float(lag),
        "rl/policy_version": float(rollout.version),
        "rl/generation_tokens_per_s": rollout.new_tokens / max(rollout.generation_seconds, 1e-9),
    }
    if kept is not None:
        metrics["rl/groups_kept_share"] = float(kept.float().mean())
    return metrics
