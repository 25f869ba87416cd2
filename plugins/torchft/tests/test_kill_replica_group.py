"""The kill test: two replica groups (one rank each) train through a local lighthouse;
one is SIGKILLed mid-run, the survivor keeps committing steps, the killed group is
restarted, heals from the live peer (it has no checkpoint of its own) and from then on
both groups hold bit-identical weights at every common checkpoint.

One scenario for the module (about 60-100 s on a loaded 2-core machine: three process
start-ups dominate); every wait is bounded and the whole run has a hard deadline.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from ft_harness import FT_TIMEOUTS, LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS, Group, events, final_weights, start_lighthouse, \
    stop_all, wait_for_event
from plait.testing import short_job

DEADLINE_SECONDS = 240
STEPS_BEFORE_KILL = 5
STEPS_TOGETHER_AFTER_HEAL = 45
CHECKPOINT_INTERVAL = 20


@pytest.fixture(scope="module")
def killed_and_healed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    dump = tmp / "dump"
    lighthouse = start_lighthouse(min_replicas=1)
    deadline = time.monotonic() + DEADLINE_SECONDS

    argvs: dict[int, list[str]] = {}

    def group(index: int) -> Group:
        # Far more steps than the test runs: both groups are stopped by SIGTERM at the end.
        argv = short_job("tinylm_debug", dump, "--plugins", "fsdp,torchft", "--torchft.lighthouse", lighthouse.address(),
                         "--torchft.replica_groups", "2", "--torchft.replica_group", str(index), *FT_TIMEOUTS,
                         "--checkpoint.keep_latest_k", "3", "--lr_scheduler.warmup_steps", "0",
                         steps=100_000, lr=1e-3, checkpoint_interval=CHECKPOINT_INTERVAL)
        argvs[index] = argv
        return Group(index, 1, argv, tmp / f"out{index}.json")

    survivor, victim = group(0).start(), group(1).start()
    groups = [survivor, victim]
    try:
        wait_for_event(dump, 1, "commit", 1, deadline)  # the first group to start may train alone a while
        first_together = min(e["step"] for e in events(dump, 1) if e["event"] == "commit")
        wait_for_event(dump, 1, "commit", first_together + STEPS_BEFORE_KILL, deadline)
        victim.kill()
        killed_at = time.time()
        killed_step = max(e["step"] for e in events(dump, 1) if e["event"] == "commit")
        victim.start(attempt=1)
        wait_for_event(dump, 1, "heal", killed_step + 1, deadline)
        healed_step = next(e["step"] for e in events(dump, 1) if e["event"] == "heal" and e["step"] > killed_step)
        wait_for_event(dump, 1, "commit", healed_step + STEPS_TOGETHER_AFTER_HEAL, deadline)
        for g in groups:
            for proc in g.procs:
                proc.send_signal(signal.SIGTERM)  # each saves a checkpoint and exits 0
        for g in groups:
            g.wait(deadline)
    finally:
        stop_all(groups)
        lighthouse.shutdown()
    return {"dump": dump, "killed_at": killed_at, "killed_step": killed_step, "healed_step": healed_step,
            "survivor": events(dump, 0), "victim": events(dump, 1), "argv": argvs}


def commits(log):
    return [e for e in log if e["event"] == "commit"]


def test_survivor_keeps_committing_every_step_once(killed_and_healed):
    steps = [e["step"] for e in commits(killed_and_healed["survivor"])]
    assert steps == list(range(steps[0], steps[-1] + 1)), "a step was skipped or committed twice"
    assert steps[-1] > killed_and_healed["healed_step"] + STEPS_TOGETHER_AFTER_HEAL - 5
    # The longest pause of the survivor's commits around the kill: the lighthouse drops the
    # dead group after its heartbeat timeout; the failed step is retried on the same batch.
    times = [e["time"] for e in commits(killed_and_healed["survivor"]) if e["time"] > killed_and_healed["killed_at"] - 1]
    pause = max(b - a for a, b in zip(times, times[1:]))
    print(f"\nsurvivor's longest pause after the kill: {pause:.2f} s")
    assert pause < LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS / 1000 + 20


def test_restarted_group_heals_from_the_live_peer(killed_and_healed):
    heal = next(e for e in killed_and_healed["victim"] if e["event"] == "heal" and e["step"] > killed_and_healed["killed_step"])
    print(f"\nheal at step {heal['step']} took {heal['seconds']:.2f} s")
    assert heal["from_step"] == 1  # a fresh start (no checkpoint of its own), moved to the peer's step
    assert heal["step"] > killed_and_healed["killed_step"] + 1  # the survivor trained on meanwhile


def expected_batches(argv: list[str], group: int, steps: int) -> list[str]:
    """Digests of the rows group ``group`` must train at steps 1 .. steps: its shard of each
    global batch of the one data stream."""
    import hashlib

    from plait.cli.config_parsing import resolve_train_config
    from plait.data import build_dataloader, build_tokenizer

    config = resolve_train_config(argv, world_size=1).config
    tokenizer = build_tokenizer(config.data.tokenizer, bos_token=config.data.bos_token, eos_token=config.data.eos_token)
    loader = build_dataloader(config.data, tokenizer, seq_len=config.training.seq_len,
                              local_batch_size=config.training.local_batch_size, dp_rank=group, dp_world_size=2)
    return [hashlib.sha256(next(loader)[0].numpy().tobytes()).hexdigest()[:16] for _ in range(steps)]


def test_every_step_trains_its_own_shard_of_that_step_exactly_once(killed_and_healed):
    logs = {0: commits(killed_and_healed["survivor"]), 1: commits(killed_and_healed["victim"])}
    last = max(e["step"] for log in logs.values() for e in log)
    for group, log in logs.items():
        expected = expected_batches(killed_and_healed["argv"][group], group, last)
        wrong = [e["step"] for e in log if e["batch"] != expected[e["step"] - 1]]
        assert not wrong, f"group {group} trained other rows than its shard at steps {wrong[:10]}"
    common = {e["step"] for e in logs[0]} & {e["step"] for e in logs[1]}
    assert len(common) >= STEPS_TOGETHER_AFTER_HEAL


def test_weights_bit_identical_after_heal(killed_and_healed):
    from plait.checkpoint import list_checkpoints

    dump = killed_and_healed["dump"]
    saved = [set(list_checkpoints(str(dump / f"replica_{g}" / "checkpoint"))) for g in (0, 1)]
    common = sorted(s for s in saved[0] & saved[1] if s > killed_and_healed["healed_step"])
    assert common, saved
    states = [final_weights(dump, g, "tinylm", "debugmodel", step=common[-1]) for g in (0, 1)]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
