"""Expert parallel 2 with FSDP 2, and with HSDP 2 × 2 (4 gloo ranks each), trains like one
process on the tiny qwen3-MoE.

ep 2 × dp_shard 4: every rank reads 1 of the 4 sequences of the global batch; the
non-expert parameters are sharded over the 4 ranks, each rank holds 4 of the 8 experts
of every layer and shares them with one other rank (``efsdp`` 2). An expert's gradient
on one rank sums the tokens of its ep group (the all-to-all brought them there); FSDP
divides it by all 4 data-parallel ranks, so it is the mean over the global batch like
every other gradient. The per-parameter check compares every gradient of the first
step, full tensors gathered, with one process's.

Gradient norms match within the loss bound (the core accumulates them in float64);
expert gradients at half their size moved the norm by 4.6e-3 at ep 2.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from plait.cli import resolve_train_config, train
from plait.testing import free_port, run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_ep")
pytest.importorskip("plait_qwen3")

STEPS = 5
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-6
GLOBAL_BATCH = 4
WORLD_SIZE = 4
EP_FSDP = ["--plugins", "ep,fsdp", "--parallelism.dp_shard", "4", "--parallelism.ep", "2"]


def job(dump, *extra, local_batch_size):
    return [
        "--config", "qwen3_moe_debugmodel",
        "--moe.aux_loss_type", "sequence",  # per sequence: the same mean however the batch is split
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


def keep_determinism_setting(run):
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return run()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    result = keep_determinism_setting(lambda: train(job(folder, local_batch_size=GLOBAL_BATCH)))
    return {"losses": result.losses, "grad_norms": result.grad_norms}


@pytest.mark.parametrize(
    "degrees",
    [
        pytest.param(EP_FSDP, id="ep2-fsdp4"),
        pytest.param(["--plugins", "ep,fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
                      "--parallelism.ep", "2"], id="ep2-hsdp2x2"),
    ],
)
def test_expert_parallel_layout_matches_single_process(tmp_path, reference, degrees):
    run = run_ranks(WORLD_SIZE, job(tmp_path, *degrees, local_batch_size=GLOBAL_BATCH // WORLD_SIZE),
                    tmp_path / "result.json")
    assert sorted(run["losses"]) == sorted(reference["losses"])
    loss_diff = max(abs(run["losses"][s] - reference["losses"][s]) for s in reference["losses"])
    norm_diff = max(abs(run["grad_norms"][s] - reference["grad_norms"][s]) for s in reference["grad_norms"])
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)


# ------------------------------------------------------------------ first-step gradients


def first_step_gradients(argv: list[str]) -> dict[str, torch.Tensor]:
    """Full gradients of every parameter after the first micro-batch's backward."""
    from plait.train import Trainer

    manager, spec, config = resolve_train_config(argv)
    trainer = Trainer(config, manager, spec)
    try:
        model = trainer.model_parts[0]
        inputs, labels = next(trainer.batches())
        trainer.loss_fn(model(inputs), labels).backward()
        return {
            name.replace("_checkpoint_wrapped_module.", ""): (
                param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            )
            for name, param in model.named_parameters()
        }
    finally:
        trainer.close()


def _gradient_rank(rank: int, port: int, argv: list[str], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    gradients = first_step_gradients(argv)
    if rank == 0:
        torch.save(gradients, os.path.join(folder, "gradients.pt"))


def test_expert_gradients_are_the_single_process_mean(tmp_path: Path):
    expected = keep_determinism_setting(
        lambda: first_step_gradients(job(tmp_path / "single", local_batch_size=GLOBAL_BATCH))
    )
    argv = job(tmp_path / "ep", *EP_FSDP, local_batch_size=GLOBAL_BATCH // WORLD_SIZE)
    mp.spawn(_gradient_rank, args=(free_port(), argv, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    gradients = torch.load(tmp_path / "gradients.pt")

    assert sorted(gradients) == sorted(expected)
    assert any(".moe.experts." in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=GRAD_TOLERANCE, msg=name)
