"""plait-torchft: training that survives the loss of a replica group (torchft)."""
from plait_torchft.config import TorchFTConfig

__all__ = ["TorchFTConfig"]
