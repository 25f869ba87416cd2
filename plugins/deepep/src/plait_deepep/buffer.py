"""The DeepEP buffer of the ep group, made once per process and kept (DeepEP allocates
its NVLink/RDMA buffers at construction, which is expensive)."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

_BUFFERS: dict[tuple[str, int], Any] = {}


def deep_ep_buffer(group: dist.ProcessGroup, *, hidden_bytes: int, num_sms: int) -> Any:
    """A ``deep_ep.Buffer`` for ``group`` sized for tokens of ``hidden_bytes`` bytes."""
    import deep_ep

    key = (group.group_name, hidden_bytes)
    if key not in _BUFFERS:
        deep_ep.Buffer.set_num_sms(num_sms)
        ranks = group.size()
        nvl_bytes = rdma_bytes = 0
        for config in (deep_ep.Buffer.get_dispatch_config(ranks), deep_ep.Buffer.get_combine_config(ranks)):
            nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, ranks))
            rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, ranks))
        _BUFFERS[key] = deep_ep.Buffer(group, nvl_bytes, rdma_bytes)
    return _BUFFERS[key]
