"""Context parallelism without processes: the head-tail layout, sharding of the batch and
the sequence buffers, validation messages, and the guard of the CPU ring-attention routes."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from plait.config import JobConfig
from plait.errors import ConfigError
from plait.parallel_dims import ParallelDims
from plait.capabilities import simulated_device
from plait.testing import check_plugins
from plait_context_parallel import cpu_ring_attention, plugin
from plait_context_parallel.attention import attention_module_paths, local_block_mask, pattern_matches
from plait_context_parallel.config import ContextParallelConfig
from plait_context_parallel.load_balance import (
    SequenceShard,
    head_tail_order,
    head_tail_positions,
    inverse_order,
)
from plait_context_parallel.micro_batch import SequenceBuffer
from plait_llama3.spec import llama3_spec

# ----------------------------------------------------------------------- the layout


def test_each_rank_holds_its_head_chunk_then_its_tail_chunk():
    assert head_tail_positions(8, cp_degree=2, cp_rank=0).tolist() == [0, 1, 6, 7]
    assert head_tail_positions(8, cp_degree=2, cp_rank=1).tolist() == [2, 3, 4, 5]
    assert head_tail_positions(12, cp_degree=3, cp_rank=1).tolist() == [2, 3, 8, 9]


def test_every_rank_gets_the_same_causal_attention_work():
    seq_len, cp = 64, 4
    work = [int((head_tail_positions(seq_len, cp_degree=cp, cp_rank=r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1  # query at position p attends to p + 1 keys


@pytest.mark.parametrize(("seq_len", "cp"), [(8, 1), (8, 2), (24, 3), (64, 4), (256, 8)])
def test_order_is_a_permutation_and_its_inverse_restores_the_sequence_exactly(seq_len, cp):
    order = head_tail_order(seq_len, cp_degree=cp)
    assert sorted(order.tolist()) == list(range(seq_len))
    batch = torch.randn(3, seq_len, 5)
    shards = [SequenceShard.head_tail(seq_len, cp_degree=cp, cp_rank=r).take(batch, dim=1) for r in range(cp)]
    gathered = torch.cat(shards, dim=1)
    assert torch.equal(gathered, batch.index_select(1, order))
    assert torch.equal(gathered.index_select(1, inverse_order(order)), batch)


def test_layout_is_the_one_torch_ring_attention_expects():
    from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer

    for seq_len, cp in [(16, 2), (48, 3), (64, 4)]:
        torch_order = _HeadTailLoadBalancer(seq_len, cp, "cpu")._generate_indices()[0]
        assert head_tail_order(seq_len, cp_degree=cp).tolist() == torch_order.tolist()


def test_a_sequence_that_does_not_split_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match="2 × cp = 4 equal chunks.* 10"):
        head_tail_positions(10, cp_degree=2, cp_rank=0)
    with pytest.raises(ValueError, match="cp rank 2 is outside 0..1"):
        head_tail_positions(8, cp_degree=2, cp_rank=2)


# ----------------------------------------------------------------------- buffers


def test_a_longer_rope_table_gives_the_rows_of_the_shard_positions():
    table = torch.arange(32.0).unsqueeze(1).expand(32, 6)  # row p holds p: [max_seq_len, 2 * head_dim]
    shard = SequenceShard.head_tail(16, cp_degree=2, cp_rank=1)
    assert shard.take(table, dim=0)[:, 0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="shorter than the sequence"):
        SequenceShard.head_tail(64, cp_degree=2, cp_rank=0).take(table, dim=0)


def test_sequence_buffer_gives_a_local_view_of_a_registered_buffer():
    owner = nn.Module()
    owner.register_buffer("table", torch.arange(8.0).unsqueeze(1), persistent=False)
    shard = SequenceShard.head_tail(8, cp_degree=2, cp_rank=0)
    view = SequenceBuffer(owner=owner, name="table", seq_dim=0).local_view(shard)
    assert view[:, 0].tolist() == [0, 1, 6, 7]


def test_flex_block_mask_is_rebuilt_for_the_local_queries_and_the_gathered_keys():
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    seq_len, cp = 16, 2
    full = create_mask(causal, 1, 1, seq_len, seq_len, device="cpu")[0, 0]
    mask = create_block_mask(causal, 1, 1, seq_len, seq_len, device="cpu")
    kv_order = head_tail_order(seq_len, cp_degree=cp)  # flex gathers keys and values rank after rank
    for rank in range(cp):
        shard = SequenceShard.head_tail(seq_len, cp_degree=cp, cp_rank=rank)
        local = local_block_mask(mask, shard)
        assert local.seq_lengths == (seq_len // cp, seq_len)
        q_idx, kv_idx = torch.meshgrid(torch.arange(seq_len // cp), torch.arange(seq_len), indexing="ij")
        expected = full.index_select(0, shard.positions).index_select(1, kv_order)
        assert torch.equal(local.mask_mod(0, 0, q_idx, kv_idx), expected)
        assert local_block_mask(mask, shard) is local  # built once per mask and rank


# ----------------------------------------------------------------------- attention modules


def test_llama3_attention_patterns_find_one_sdpa_module_per_block():
    spec = llama3_spec()
    with torch.device("meta"):
        model = spec.build(spec.args_for("debugmodel_tiny"))
    paths = attention_module_paths(model, spec.cp_attention_modules)
    assert paths == ["layers.0.attention.sdpa", "layers.1.attention.sdpa"]
    assert pattern_matches("layers.*.attention.sdpa", "layers.12.attention.sdpa")
    assert not pattern_matches("layers.*.attention", "layers.0.attention.sdpa")


# ----------------------------------------------------------------------- validation


def _config(seq_len: int = 64, rotate_method: str = "allgather") -> JobConfig:
    config = JobConfig()
    config.model.name = "llama3"
    config.model.flavor = "debugmodel_tiny"
    config.training.seq_len = seq_len
    config.context_parallel = ContextParallelConfig(rotate_method=rotate_method)  # added by the CLI when enabled
    return config


def _validate(config: JobConfig, *, cp: int = 2, tp: int = 1, spec=None, device: str = "cpu") -> None:
    dims = ParallelDims(cp=cp, tp=tp, dp_shard=1, world_size=cp * tp)
    check_plugins(plugin, config=config, parallel_dims=dims, model_spec=spec or llama3_spec(),
                  device=simulated_device(device))


def test_valid_llama3_job_passes():
    _validate(_config(seq_len=64), cp=2)
    _validate(_config(seq_len=64, rotate_method="alltoall"), cp=4)


def test_model_without_cp_attention_is_refused_by_name():
    spec = dataclasses.replace(llama3_spec(), name="ringless", cp_attention=None)
    with pytest.raises(ConfigError, match="model 'ringless' does not support context parallelism .*cp_attention=None"):
        _validate(_config(), spec=spec)


def test_model_with_learned_positions_is_refused():
    spec = dataclasses.replace(llama3_spec(), name="positional", sequence_indexed_parameters=("pos_embedding.weight",))
    with pytest.raises(ConfigError, match=r"'positional' has parameters indexed by sequence position .*--parallelism\.cp 1"):
        _validate(_config(), spec=spec)


def test_model_without_attention_module_patterns_is_refused():
    spec = dataclasses.replace(llama3_spec(), name="patternless", cp_attention_modules=())
    with pytest.raises(ConfigError, match="'patternless' .* names no cp_attention_modules"):
        _validate(_config(), spec=spec)


def test_seq_len_must_split_into_2cp_chunks_and_a_valid_length_is_suggested():
    with pytest.raises(ConfigError, match=r"seq_len 60 must be a multiple of 8: .*2 × cp = 8 .*seq_len 56"):
        _validate(_config(seq_len=60), cp=4)
    with pytest.raises(ConfigError, match=r"seq_len 2 must be a multiple of 4.*--training.seq_len 4"):
        _validate(_config(seq_len=2), cp=2)


def test_the_chunks_are_declared_whatever_the_other_degrees():
    """The core multiplies them with the other plugins' splits (sequence parallelism's tp)."""
    for tp in (1, 2):
        dims = ParallelDims(cp=4, tp=tp, dp_shard=1, world_size=4 * tp)
        assert plugin.plait_run_needs(config=_config(), parallel_dims=dims, model_spec=llama3_spec()).sequence_splits == 8
    assert plugin.plait_run_needs(config=_config(), parallel_dims=ParallelDims(world_size=1), model_spec=None) is None


def test_unknown_rotate_method_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="rotate_method must be one of allgather, alltoall, got 'ring'"):
        ContextParallelConfig(rotate_method="ring").validate()  # type: ignore[arg-type]


def test_alltoall_is_refused_for_flex_attention():
    spec = dataclasses.replace(llama3_spec(), name="flexy", cp_attention="flex")
    with pytest.raises(ConfigError, match="'flexy' uses flex attention.*rotate_method allgather"):
        _validate(_config(rotate_method="alltoall"), spec=spec)


def test_cp_one_needs_nothing_from_the_model():
    spec = dataclasses.replace(llama3_spec(), cp_attention=None, cp_attention_modules=())
    _validate(_config(seq_len=7), cp=1, spec=spec)
    assert plugin.plait_train_context(config=None, parallel_dims=ParallelDims(world_size=1), ctx=None) is None


# ----------------------------------------------------------------------- CPU ring-attention routes


def test_cpu_routes_accept_this_torch():
    """Fails when torch is upgraded: re-check the routes against the new internals, then
    move SUPPORTED_TORCH."""
    cpu_ring_attention.check_supported()
    cpu_ring_attention.install()
    assert cpu_ring_attention.is_installed()


@pytest.mark.parametrize("version", ["2.14.0", "2.12.1+cpu", "3.0.0"])
def test_cpu_routes_refuse_another_torch_version(version):
    expected = f"written for torch 2.13.x and this is torch {re.escape(version)}"
    with pytest.raises(cpu_ring_attention.UnsupportedTorchError, match=expected):
        cpu_ring_attention.check_supported(version)


def test_validation_refuses_cp_on_cpu_with_another_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.14.0")
    with pytest.raises(ConfigError, match="install torch 2.13"):
        _validate(_config())
    _validate(_config(), device="H100")  # on a GPU torch routes SDPA itself


def test_changed_op_signature_is_refused(monkeypatch):
    schemas = {**cpu_ring_attention._OP_SCHEMAS, "_scaled_dot_product_flash_attention_for_cpu": "aten::other()"}
    monkeypatch.setattr(cpu_ring_attention, "_OP_SCHEMAS", schemas)
    expected = r"changed ops: _scaled_dot_product_flash_attention_for_cpu\)"
    with pytest.raises(cpu_ring_attention.UnsupportedTorchError, match=expected):
        cpu_ring_attention.check_supported()
