"""Plugin module: light at import; deep_ep is imported only when a dispatcher is built."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Callable

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

PLAIT_API_VERSION = 1
PROVIDES = ("ep_dispatch:deepep",)
REQUIRES = ("ep",)
DESCRIPTION = "deepep: DeepEP token dispatch for expert parallelism (GPU, NVLink/RDMA)"

INSTALL_HINT = (
    "DeepEP builds from source against CUDA and NVSHMEM: see https://github.com/deepseek-ai/DeepEP "
    "(pip install --no-build-isolation . in its checkout, with torch already installed)"
)


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_deepep.config import DeepEPConfig

    register("deepep", DeepEPConfig)


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """DeepEP's kernels run on NVIDIA GPUs of compute capability 9.0 and later only."""
    if not parallel_dims.ep_enabled:
        return None
    return RunNeeds(requires=("deepep",), requires_fix="drop deepep from --plugins to dispatch with the ep "
                                                      "plugin's all-to-all instead")


def missing_requirements(config: JobConfig) -> list[str]:
    """What this environment and job lack for DeepEP, in words; empty when nothing. (The
    device's DeepEP capability is declared in ``plait_run_needs``.)"""
    missing = []
    if importlib.util.find_spec("deep_ep") is None:
        missing.append(f"the deep_ep library (not installed; {INSTALL_HINT})")
    if config.training.dtype != "bfloat16":
        missing.append(f"--training.dtype bfloat16 (DeepEP moves bf16 tokens; this job uses {config.training.dtype})")
    return missing


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    if not parallel_dims.ep_enabled:
        raise ConfigError(
            "the deepep plugin dispatches tokens between expert-parallel ranks, and this job has none: "
            "set --parallelism.ep > 1 or drop deepep from --plugins"
        )
    missing = missing_requirements(config)
    if missing:
        raise ConfigError(
            "--plugins deepep needs " + "; ".join(missing)
            + ". Drop deepep from --plugins to dispatch with the ep plugin's all-to-all instead."
        )


@hookimpl(wrapper=True)
def plait_token_dispatcher(config: JobConfig, parallel_dims: ParallelDims) -> Any:
    """Replaces the ep plugin's all-to-all dispatcher, whatever the plugin order."""
    all_to_all = yield
    if not parallel_dims.ep_enabled:
        return all_to_all
    from plait_deepep.buffer import deep_ep_buffer
    from plait_deepep.dispatcher import DeepEPTokenDispatcher

    group = parallel_dims.get_mesh("ep").get_group()
    section = config.deepep
    return DeepEPTokenDispatcher(
        lambda hidden_bytes: deep_ep_buffer(group, hidden_bytes=hidden_bytes, num_sms=section.num_sms),
        ranks=parallel_dims.ep,
        overlap_shared_experts=section.overlap_shared_experts,
    )
