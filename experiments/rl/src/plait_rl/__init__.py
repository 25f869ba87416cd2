"""Reinforcement learning (GRPO, Dr.GRPO, DAPO) on plait's own trainer: the ``rl`` plugin
turns ``plait train`` into a policy-gradient loop whose rollouts come from generator
processes running the same model class with the trainer's weights."""

__version__ = "0.1.0"
