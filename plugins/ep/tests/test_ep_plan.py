"""`plait plan` with expert parallelism: the experts are sharded over ep × efsdp and one
micro-batch runs on fake tensors through the all-to-all dispatcher (assuming a perfectly
balanced exchange, since fake routing has no values)."""
from __future__ import annotations

from plait.cli import resolve_train_config
from plait.plan import plan


def test_plan_shards_experts_and_measures_a_step():
    argv = ["--config", "qwen3_moe_debugmodel", "--plugins", "ep,fsdp", "--parallelism.dp_shard", "8",
            "--parallelism.ep", "4", "--training.seq_len", "64", "--training.local_batch_size", "2"]
    result = plan(resolve_train_config(argv, world_size=8, prog="plait plan"))

    assert (result.meshes["ep"], result.meshes["efsdp"]) == (4, 2)
    rank = result.ranks[0]
    assert rank.parameters == result.total_parameters // 8  # experts over ep × efsdp, the rest over dp_shard
    assert rank.step_peak_bytes is not None, rank.note
