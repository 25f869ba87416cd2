"""plait-pipeline: pipeline parallelism over the stages of a model spec (see README.md)."""
from plait_pipeline.config import PipelineConfig

__all__ = ["PipelineConfig"]
