"""A tiny language model of the core tests' own, registered by an in-process plugin,
trained in this process on the embedded data: the core's tests need no model package."""
from __future__ import annotations

import torch
from torch import nn

from plait import hookimpl
from plait.config import JobConfig
from plait.job import resolve_job
from plait.model_spec import ModelSpec
from plait.plugins import PluginManager
from plait.train import Trainer

VOCAB = 2048  # the embedded tokenizer's


class ToyLM(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim)])
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        for layer in self.layers:
            hidden = hidden + torch.tanh(layer(hidden))
        return self.head(hidden)

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)


class MarkedLinear(nn.Linear):
    """What the toy conversion swaps the head for."""


TOY_SPEC = ModelSpec(name="hooktoy", flavors={"tiny": 16}, build=ToyLM, flops_per_token=lambda dim, seq: 6.0 * dim)


class ToyModelPlugin:
    PLAIT_API_VERSION = 1
    PROVIDES = ("model:hooktoy",)
    REQUIRES = ()

    @hookimpl
    def plait_register_models(self, register):
        register(TOY_SPEC)


def toy_config(folder, *, steps: int = 3, **training) -> JobConfig:
    config = JobConfig()
    config.model.name, config.model.flavor = "hooktoy", "tiny"
    config.job.dump_folder = str(folder)
    config.training.steps = steps
    config.training.seq_len = 16
    config.training.local_batch_size = 2
    for name, value in training.items():
        setattr(config.training, name, value)
    config.checkpoint.interval = 2
    config.metrics.enable_tensorboard = False
    config.metrics.log_freq = 2
    config.lr_scheduler.warmup_steps = 0
    return config


def manager_with(*plugins: object) -> PluginManager:
    manager = PluginManager()
    for index, plugin in enumerate(plugins):
        manager.register_object(plugin, f"throwaway{index}")
    return manager


def train_toy(config: JobConfig, *plugins: object):
    manager = manager_with(*plugins)
    trainer = Trainer(resolve_job(config, manager, manager.model_spec("hooktoy"), world_size=1))
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()
