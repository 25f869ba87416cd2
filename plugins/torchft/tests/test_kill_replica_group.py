"""The kill test: two replica groups (one rank each) train through a local lighthouse;
group 0 writes the run's checkpoints, group 1 writes none. In one launch:

1. group 1 is SIGKILLed mid-run and restarted: it resumes from the run's last checkpoint
   and heals from group 0, which never stops committing;
2. group 1 is SIGKILLed again as soon as group 0 serves its heal, and restarted: it heals;
3. group 0 is SIGKILLed while it saves a checkpoint: group 1 trains on alone, the
   unfinished save is never taken for a checkpoint, the last complete one loads; group 0
   is restarted, resumes from that checkpoint and heals from group 1;
4. both stop on SIGTERM (group 0 saves) and the whole job is restarted: both groups
   resume from that checkpoint, group 1 from group 0's, and train on in lockstep.

About 35-60 s on a loaded 2-core machine (seven process start-ups dominate); every wait
is bounded and the run has a deadline.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ft_harness import FT_TIMEOUTS, LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS, Group, checkpoint_weights, events, \
    start_lighthouse, stop_all, wait_for_event, weight_digests
from plait.checkpoint import list_checkpoints
from plait.testing import short_job

DEADLINE_SECONDS = 150
STEPS_BEFORE_KILL = 5
STEPS_ALONE = 5
STEPS_TOGETHER_AFTER_HEAL = 25
CHECKPOINT_INTERVAL = 10


def kill_during_save(group: Group, folder: Path, deadline: float) -> int:
    """SIGKILL the group while its rank 0 has a checkpoint save open (``step-N.partial``);
    returns N."""
    while time.monotonic() < deadline:
        partial = [entry.name for entry in os.scandir(folder) if entry.name.endswith(".partial")] \
            if folder.exists() else []
        if partial:
            group.kill()
            return int(partial[0].split("-")[1].split(".")[0])
        time.sleep(0.002)
    raise AssertionError(f"group {group.index} started no checkpoint save in time")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    dump = tmp / "dump"
    checkpoints = dump / "checkpoint"
    lighthouse = start_lighthouse(min_replicas=1)
    deadline = time.monotonic() + DEADLINE_SECONDS
    argvs: dict[int, list[str]] = {}
    record: dict = {"dump": dump, "argv": argvs}

    def group(index: int) -> Group:
        # Far more steps than the test runs: both groups are stopped by SIGTERM at the end.
        argv = short_job("tinylm_debug", dump, "--plugins", "fsdp,torchft", "--torchft.lighthouse", lighthouse.address(),
                         "--torchft.replica_groups", "2", "--torchft.replica_group", str(index), *FT_TIMEOUTS,
                         "--checkpoint.keep_latest_k", "3", "--lr_scheduler.warmup_steps", "0",
                         steps=100_000, lr=1e-3, checkpoint_interval=CHECKPOINT_INTERVAL)
        argvs[index] = argv
        return Group(index, 1, argv, tmp / f"out{index}.json")

    writer, other = group(0).start(), group(1).start()
    groups = [writer, other]
    try:
        first = wait_for_event(dump, 1, "commit", 1, deadline)  # the first group up may train alone a while
        wait_for_event(dump, 1, "commit", first["step"] + STEPS_BEFORE_KILL, deadline)
        # 1. group 1 killed mid-run, restarted
        other.kill()
        record["kill_mid_run"] = time.time()
        record["killed_step"] = max(e["step"] for e in events(dump, 1) if e["event"] == "commit")
        # group 0 trains on alone past the next checkpoint, so that the restarted group is
        # behind and heals (a restart quicker than group 0's quorum timeout would find it
        # still waiting at the killed step, with nothing to heal)
        wait_for_event(dump, 0, "commit", record["killed_step"] + CHECKPOINT_INTERVAL + 1, deadline,
                       after=record["kill_mid_run"])
        other.start(attempt=1)
        # 2. killed again while group 0 serves its heal, restarted
        served = wait_for_event(dump, 0, "heal_served", 1, deadline, after=record["kill_mid_run"], poll=0.005)
        other.kill()
        record["kill_during_heal"] = time.time()
        record["heal_applied_before_kill"] = any(e["event"] == "heal" and e["time"] > record["kill_mid_run"]
                                                 for e in events(dump, 1))
        # as above: group 0 runs ahead first, so that the restarted group must heal
        wait_for_event(dump, 0, "commit", served["step"] + CHECKPOINT_INTERVAL + 1, deadline,
                       after=record["kill_during_heal"])
        other.start(attempt=2)
        healed = wait_for_event(dump, 1, "heal", served["step"], deadline, after=record["kill_during_heal"])
        record["group1_heal"] = healed
        wait_for_event(dump, 1, "commit", healed["step"] + STEPS_BEFORE_KILL, deadline)
        # 3. group 0, the writer, killed during a checkpoint save; group 1 trains on alone
        record["partial_step"] = kill_during_save(writer, checkpoints, deadline)
        record["kill_during_save"] = time.time()
        record["complete_at_kill"] = list_checkpoints(str(checkpoints))
        alone_from = max(e["step"] for e in events(dump, 1) if e["event"] == "commit")
        wait_for_event(dump, 1, "commit", alone_from + STEPS_ALONE, deadline)
        record["partial_left"] = (checkpoints / f"step-{record['partial_step']}.partial").exists()
        # the last complete checkpoint loads (checksums hold) before the writer comes back
        checkpoint_weights(dump, "tinylm", "debugmodel", step=record["complete_at_kill"][-1])
        writer.start(attempt=1)
        record["group0_heal"] = wait_for_event(dump, 0, "heal", 1, deadline, after=record["kill_during_save"])
        record["partial_after_restart"] = (checkpoints / f"step-{record['partial_step']}.partial").exists()
        wait_for_event(dump, 1, "commit", record["group0_heal"]["step"] + STEPS_TOGETHER_AFTER_HEAL, deadline)
        record["stop"] = time.time()
        stop_by_signal(groups, deadline)  # group 0 saves a checkpoint; both exit 0
        # 4. the whole job restarted: both groups resume from the run's last checkpoint
        record["final_checkpoint"] = list_checkpoints(str(checkpoints))[-1]
        record["job_restart"] = time.time()
        writer.start(attempt=2)
        other.start(attempt=3)
        for g in (0, 1):
            wait_for_event(dump, g, "commit", record["final_checkpoint"] + 3, deadline, after=record["job_restart"])
        stop_by_signal(groups, deadline)
    finally:
        stop_all(groups)
        lighthouse.shutdown()
    record["events"] = {g: events(dump, g) for g in (0, 1)}
    return record


def stop_by_signal(groups: list[Group], deadline: float) -> None:
    for g in groups:
        for proc in g.procs:
            proc.send_signal(signal.SIGTERM)
    for g in groups:
        g.wait(deadline)


def commit_steps(log, *, after: float = 0.0, before: float = float("inf")) -> list[int]:
    return [e["step"] for e in log if e["event"] == "commit" and after < e["time"] < before]


def assert_consecutive(steps: list[int], who: str) -> None:
    assert steps == list(range(steps[0], steps[-1] + 1)), f"{who}: a step was skipped or committed twice: {steps}"


def longest_pause(log, *, after: float, before: float = float("inf")) -> float:
    times = [e["time"] for e in log if e["event"] == "commit" and after - 1 < e["time"] < before]
    return max(b - a for a, b in zip(times, times[1:]))


def test_survivors_keep_committing_every_step_once(run):
    group0, group1 = run["events"][0], run["events"][1]
    # group 0 through both kills of group 1, until it was killed itself
    assert_consecutive(commit_steps(group0, before=run["kill_during_save"]), "group 0 before its kill")
    # group 1 from its last heal through group 0's absence to the end
    assert_consecutive(commit_steps(group1, after=run["group1_heal"]["time"], before=run["stop"]),
                       "group 1 after its last heal")
    assert_consecutive(commit_steps(group0, after=run["group0_heal"]["time"], before=run["stop"]),
                       "group 0 after its heal")
    # The survivors' longest pause after each kill: the lighthouse drops the dead group after
    # its heartbeat timeout; the failed step is retried on the same batch.
    bound = LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS / 1000 + 20
    pauses = {"mid-run kill": longest_pause(group0, after=run["kill_mid_run"], before=run["kill_during_save"]),
              "kill during a heal": longest_pause(group0, after=run["kill_during_heal"], before=run["kill_during_save"]),
              "kill during a save": longest_pause(group1, after=run["kill_during_save"], before=run["stop"])}
    print("\nsurvivors' longest pauses: " + ", ".join(f"{k} {v:.2f} s" for k, v in pauses.items()))
    assert max(pauses.values()) < bound, pauses


def test_restarted_groups_resume_from_the_run_checkpoint_and_heal(run):
    heal1, heal0 = run["group1_heal"], run["group0_heal"]
    print(f"\ngroup 1 healed at step {heal1['step']} in {heal1['seconds']:.2f} s (the kill during its previous heal "
          f"came {'after' if run['heal_applied_before_kill'] else 'before'} it applied the state); group 0 healed "
          f"at step {heal0['step']} in {heal0['seconds']:.2f} s")
    # group 1 writes no checkpoint: it resumed from one of group 0's (or started fresh), then healed
    assert (heal1["from_step"] - 1) % CHECKPOINT_INTERVAL == 0 and heal1["step"] > heal1["from_step"]
    # group 0 resumed from its last complete checkpoint (nobody wrote one while it was down)
    assert heal0["from_step"] - 1 == run["complete_at_kill"][-1]
    assert heal0["step"] > heal0["from_step"]


def test_the_whole_job_restarted_resumes_from_the_run_checkpoint(run):
    for g in (0, 1):
        after = [e for e in run["events"][g] if e["time"] > run["job_restart"]]
        assert [e["step"] for e in after if e["event"] == "commit"][0] == run["final_checkpoint"] + 1, g
        assert not any(e["event"] == "heal" for e in after), f"group {g} healed instead of resuming"


def test_a_save_killed_midway_leaves_the_last_checkpoint_intact(run):
    assert run["partial_step"] not in run["complete_at_kill"]
    assert run["partial_left"] and not run["partial_after_restart"]  # removed when the writer came back
    # (the fixture loaded the last complete one, run["complete_at_kill"][-1], before the restart)
    assert not any((run["dump"] / f"replica_{g}" / "checkpoint").exists() for g in (0, 1))


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


def test_every_step_trains_its_own_shard_of_that_step_exactly_once(run):
    logs = {g: [e for e in run["events"][g] if e["event"] == "commit"] for g in (0, 1)}
    last = max(e["step"] for log in logs.values() for e in log)
    for group, log in logs.items():
        expected = expected_batches(run["argv"][group], group, last)
        wrong = [e["step"] for e in log if e["batch"] != expected[e["step"] - 1]]
        assert not wrong, f"group {group} trained other rows than its shard at steps {wrong[:10]}"
        steps = [e["step"] for e in log]
        assert len(steps) == len(set(steps)), f"group {group} committed a step twice"


def test_weights_bit_identical_after_heal(run):
    digests = [weight_digests(run["dump"], g) for g in (0, 1)]
    common = sorted(s for s in set(digests[0]) & set(digests[1]) if s > run["group0_heal"]["step"])
    assert len(common) >= 2, digests
    for step in common:
        assert digests[0][step] == digests[1][step], step
