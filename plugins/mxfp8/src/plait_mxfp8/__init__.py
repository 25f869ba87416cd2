"""plait-mxfp8: MXFP8 training of linear layers and MoE grouped experts through torchao."""
from plait_mxfp8.config import Mxfp8Config

__all__ = ["Mxfp8Config"]
