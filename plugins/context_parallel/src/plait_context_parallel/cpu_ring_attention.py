"""Ring attention for the CPU SDPA kernel, for torch 2.13 only.

torch's context parallelism sends the CUDA SDPA kernels (flash, memory-efficient, cuDNN)
to its ring attention, but not the CPU flash kernel: on CPU every context-parallel SDPA
fails with "Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not
have a sharding strategy registered". ``install()`` adds the two missing routes (forward
and backward) to torch's table of context-parallel op handlers; the work is done by
torch's own ring-attention loops, with the CPU kernel as the per-block attention.

It reaches into private torch internals (the handler table and the ring-attention
functions of ``torch.distributed.tensor.experimental._context_parallel._attention``) and
the exact signatures of the two CPU ops, all checked against torch 2.13; any other
version is refused with a message rather than risking silently wrong attention.
"""
from __future__ import annotations

from typing import Any

import torch

from plait.errors import ConfigError, PlaitError

SUPPORTED_TORCH = "2.13"
#: The sequence dim of q, k, v ([batch, heads, seq, head_dim]); torch's CP rules use it too.
SEQ_DIM = 2
_FORWARD_SCHEMA = (
    "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
    "-> (Tensor output, Tensor logsumexp)"
)
_BACKWARD_SCHEMA = (
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, "
    "Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)
_OP_SCHEMAS = {
    "_scaled_dot_product_flash_attention_for_cpu": _FORWARD_SCHEMA,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _BACKWARD_SCHEMA,
}
_TORCH_INTERNALS = ("custom_ops", "_templated_ring_attention", "_templated_ring_attention_backward")


class UnsupportedTorchError(ConfigError):
    """The CPU ring-attention routes were written for another torch version."""


def _torch_release(version: str) -> str:
    """The release series of a version string: 2.13.0+cpu -> 2.13."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_supported(torch_version: str | None = None) -> None:
    """Raise ``UnsupportedTorchError`` unless this torch has the internals the routes use."""
    version = torch_version or torch.__version__
    if _torch_release(version) != SUPPORTED_TORCH:
        raise UnsupportedTorchError(
            f"context parallelism on CPU needs plait-context-parallel's ring-attention routes for "
            f"the CPU SDPA kernel, which are written for torch {SUPPORTED_TORCH}.x and this is torch "
            f"{version}: install torch {SUPPORTED_TORCH} (pip install -c constraints/cpu.txt ...), or run "
            f"context parallelism on CUDA, where torch routes SDPA itself"
        )
    try:
        attention = _torch_attention_module()
    except ImportError:
        attention = None
    missing = [name for name in _TORCH_INTERNALS if not hasattr(attention, name)]
    changed = [op_name for op_name, expected in _OP_SCHEMAS.items() if _schema_of(op_name) != expected]
    if missing or changed:
        raise UnsupportedTorchError(
            f"torch {version} lacks what the CPU ring-attention routes use (missing: "
            f"{', '.join(missing) or 'none'}; changed ops: {', '.join(changed) or 'none'}); this build "
            f"differs from torch {SUPPORTED_TORCH} as released: run context parallelism on CUDA"
        )


def _schema_of(op_name: str) -> str | None:
    op = getattr(torch.ops.aten, op_name, None)
    return str(op.default._schema) if op is not None else None


def _torch_attention_module() -> Any:
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


def install() -> None:
    """Route the CPU SDPA kernel through ring attention under context parallelism.
    Idempotent; takes effect whenever torch's context-parallel dispatcher is enabled."""
    check_supported()
    attention = _torch_attention_module()
    aten = torch.ops.aten
    attention.custom_ops[aten._scaled_dot_product_flash_attention_for_cpu.default] = _ring_forward
    attention.custom_ops[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = _ring_backward


def is_installed() -> bool:
    handlers = _torch_attention_module().custom_ops
    return handlers.get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default) is _ring_forward


# --------------------------------------------------------------------------- the routes


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The op's arguments by name, in ``names`` order, from a dispatcher call."""
    values = dict(defaults)
    values.update(zip(names, args))
    values.update(kwargs)
    return [values[name] for name in names]


def _sequence_mesh(*tensors: Any) -> Any:
    """The 1-D cp mesh of q, k, v, which must all be sharded on the sequence dim."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = tensors[0].device_mesh
    for tensor in tensors:
        sharded = isinstance(tensor, DTensor) and tuple(tensor.placements) == (Shard(SEQ_DIM),)
        if not sharded or tensor.device_mesh != mesh:
            raise PlaitError(
                "context-parallel attention on CPU expects q, k and v sharded on the sequence dim "
                f"(Shard({SEQ_DIM})) of one 1-D cp mesh; got {getattr(tensor, 'placements', type(tensor).__name__)}"
            )
    return mesh


def _as_sequence_shards(mesh: Any, tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    from torch.distributed.tensor import DTensor, Shard

    return tuple(DTensor.from_local(t, mesh, [Shard(SEQ_DIM)], run_check=False) for t in tensors)


def _refuse_mask(attn_mask: Any) -> None:
    if attn_mask is not None:
        raise PlaitError(
            "context-parallel SDPA supports is_causal=True (or no mask), not an explicit attn_mask: "
            "express the mask through is_causal"
        )


_FORWARD_NAMES = ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")
_FORWARD_DEFAULTS = {"dropout_p": 0.0, "is_causal": False, "attn_mask": None, "scale": None}


def _ring_forward(op: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    query, key, value, dropout_p, is_causal, attn_mask, scale = _bind(_FORWARD_NAMES, _FORWARD_DEFAULTS, args, kwargs)
    _refuse_mask(attn_mask)
    mesh = _sequence_mesh(query, key, value)
    output, logsumexp = _torch_attention_module()._templated_ring_attention(
        mesh.get_group(),
        SEQ_DIM,
        op,
        query.to_local(),
        key.to_local(),
        value.to_local(),
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=scale,
    )
    return _as_sequence_shards(mesh, (output, logsumexp))


_BACKWARD_NAMES = (
    "grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal", "attn_mask", "scale",
)  # fmt: skip
_BACKWARD_DEFAULTS = {"attn_mask": None, "scale": None}


def _ring_backward(op: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask, scale = _bind(
        _BACKWARD_NAMES, _BACKWARD_DEFAULTS, args, kwargs
    )
    _refuse_mask(attn_mask)
    mesh = _sequence_mesh(query, key, value)
    grads = _torch_attention_module()._templated_ring_attention_backward(
        mesh.get_group(),
        SEQ_DIM,
        op,
        grad_out=grad_out.to_local(),
        grad_out_name="grad_out",
        query=query.to_local(),
        key=key.to_local(),
        value=value.to_local(),
        out=out.to_local(),
        logsumexp=logsumexp.to_local(),
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=scale,
    )
    return _as_sequence_shards(mesh, tuple(grads[:3]))
