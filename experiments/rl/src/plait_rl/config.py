"""The ``--rl.*`` options (config section ``rl``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError

#: Per loss: (advantages divided by the group's std, how token losses are averaged, default upper clip)
LOSS_PRESETS = {
    "grpo": ("std", "sequence", 0.2),
    "dr_grpo": ("none", "constant", 0.2),
    "dapo": ("std", "token", 0.28),
}


@dataclass(kw_only=True, slots=True)
class RLSection:
    """Policy-gradient training on rollouts (the rl plugin, experiments/rl)."""

    task: Literal["reverse", "copy", "add"] = "reverse"
    """The toy task with a programmatic reward (plait_rl.tasks)."""
    digits: int = 4
    """Longest digit string of a prompt (each prompt draws 2..digits digits)."""
    group_size: int = 8
    """Completions sampled per prompt; advantages are relative to the group."""
    max_new_tokens: int = 8
    """Longest completion; also Dr.GRPO's constant length normalizer."""
    temperature: float = 1.0
    """Sampling temperature; the policy's log-probabilities use the same one."""
    loss: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """grpo: std-scaled advantages, per-sequence token mean; dr_grpo: unscaled advantages,
    sum over tokens / max_new_tokens; dapo: std-scaled, token mean over the batch, clip-higher,
    groups of equal rewards filtered out (docs in experiments/rl/README.md)."""
    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = -1.0
    """The ratio is clipped above at 1 + clip_high; -1 = the loss's default (0.2; dapo 0.28)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy (the weights of the first step); 0 = none."""
    max_policy_lag: int = 0
    """0: synchronous (every rollout comes from the current weights); K > 0: a rollout may
    come from weights up to K optimizer steps old (generation overlaps training)."""
    generators: int = 1
    """Generator processes; 0 generates in the trainer's rank-0 process (only with max_policy_lag 0)."""
    seed: int = 0
    """Seed of the prompts and of the sampling."""

    @property
    def advantage_scaling(self) -> str:
        return LOSS_PRESETS[self.loss][0]

    @property
    def normalization(self) -> str:
        return LOSS_PRESETS[self.loss][1]

    @property
    def upper_clip(self) -> float:
        return LOSS_PRESETS[self.loss][2] if self.clip_high == -1 else self.clip_high

    @property
    def filter_equal_groups(self) -> bool:
        return self.loss == "dapo"

    def validate(self) -> None:
        checks = [
            (self.group_size >= 2, f"--rl.group_size must be >= 2 (advantages compare completions of one prompt), "
                                   f"got {self.group_size}"),
            (self.digits >= 2, f"--rl.digits must be >= 2, got {self.digits}"),
            (self.max_new_tokens >= 1, f"--rl.max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--rl.temperature must be > 0 (the policy is softmax(logits / temperature)), "
                                   f"got {self.temperature}"),
            (0 <= self.clip_low < 1, f"--rl.clip_low must be in [0, 1), got {self.clip_low}"),
            (self.clip_high == -1 or self.clip_high >= 0,
             f"--rl.clip_high must be >= 0, or -1 for the loss's default, got {self.clip_high}"),
            (self.kl_coef >= 0, f"--rl.kl_coef must be >= 0, got {self.kl_coef}"),
            (self.max_policy_lag >= 0,
             f"--rl.max_policy_lag must be >= 0 (0 = synchronous), got {self.max_policy_lag}"),
            (self.generators >= 0, f"--rl.generators must be >= 0, got {self.generators}"),
            (self.generators > 0 or self.max_policy_lag == 0,
             f"--rl.max_policy_lag {self.max_policy_lag} needs generator processes to overlap generation with "
             "training: set --rl.generators 1 or more, or --rl.max_policy_lag 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
