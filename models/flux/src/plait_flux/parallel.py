"""How flux is sharded: the tensor-parallel plan and the context-parallel inputs.

Tensor parallelism shards every attention by heads (q, k, v column-wise, the output
projection row-wise) and every MLP by hidden features, in both kinds of block; the
modulations, embedders and final layer are small per-sample projections every rank keeps
whole. The token streams between blocks stay whole on every rank (no sequence
parallelism: the image and text streams and their concatenation would each need their own
sequence layout).

The per-head q/k RMSNorms see only this rank's heads, so their scale's gradient is a
partial sum: they run on DTensors marked as sharded over the heads (dim 1 of
``[batch, heads, seq, head_dim]``), and DTensor sums the gradient over the tp ranks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

from plait.model_spec import TPPlan, TPStyle, module_path_matches

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

HEADS_DIM = 1

_REPLICATED = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
               "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear",
               "final_layer.adaLN_modulation.1", "blocks.*.img_mod.lin", "blocks.*.txt_mod.lin",
               "blocks.*.modulation.lin")
_ATTENTION = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise"}

HEAD_NORMS = tuple(f"blocks.*.{prefix}norm.{norm}" for prefix in ("img_attn.", "txt_attn.", "")
                   for norm in ("query_norm", "key_norm"))


def _styles() -> dict[str, TPStyle]:
    styles: dict[str, TPStyle] = {path: "replicate" for path in _REPLICATED}
    for stream in ("img", "txt"):  # double-stream blocks
        styles |= {f"blocks.*.{stream}_attn.{name}": style for name, style in _ATTENTION.items()}
        styles |= {f"blocks.*.{stream}_attn.proj": "rowwise",
                   f"blocks.*.{stream}_mlp.0": "colwise", f"blocks.*.{stream}_mlp.2": "rowwise"}
    # single-stream blocks
    styles |= {f"blocks.*.{name}": style for name, style in _ATTENTION.items()}
    styles |= {"blocks.*.attn_out": "rowwise", "blocks.*.mlp_in": "colwise", "blocks.*.mlp_out": "rowwise"}
    return styles


def parallelize_head_norms(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Put every q/k RMSNorm of ``model`` on head-sharded DTensors; returns how many."""
    def replicate(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            replicated = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
            module.register_parameter(param_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    def heads_sharded(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        (x,) = inputs
        return (DTensor.from_local(x, mesh, [Shard(HEADS_DIM)], run_check=False),)

    def local(module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        return output.to_local()

    norms = [module for path, module in model.named_modules()
             if any(module_path_matches(pattern, path) for pattern in HEAD_NORMS)]
    for norm in norms:
        distribute_module(norm, tp_mesh, replicate, heads_sharded, local)
    return len(norms)


TP_PLAN = TPPlan(
    styles=_styles(),
    divisible_by_tp=("num_heads", "mlp_hidden_dim"),
    extra=parallelize_head_norms,
    extra_covers=HEAD_NORMS,
    sequence_parallel=False,
)


#: Context parallelism cuts the image and the text tokens (and their position ids) of each
#: sample into equal shares per rank; a rank's attention queries are its text tokens then
#: its image tokens, against every rank's keys (unmasked, so the order does not matter),
#: and the RoPE of each token follows from its own ids.
CP_SEQUENCE_INPUTS = {"img": 1, "img_ids": 1, "txt": 1, "txt_ids": 1}
