"""plait-float8: float8 training of linear layers through torchao."""
from plait_float8.config import Float8Config

__all__ = ["Float8Config"]
