"""Replica groups train in lockstep (synchronous mode): every step's loss equals, within
1e-5, one process training on the union of the groups' batches, and the groups hold
bit-identical weights (their digests at the checkpoint steps; group 0 alone writes the
checkpoint). Two groups of two FSDP ranks (20-35 s on a loaded 2-core machine: four ranks
and a reference process start up), and three groups of one rank (the launch of
conftest.py, shared with the LocalSGD and DiLoCo tests)."""
from __future__ import annotations

import json
import time

from ft_harness import SYNC_STEPS, Group, start_groups, start_lighthouse, stop_all, weight_digests
from plait.testing import assert_losses_match, short_job, train_in_this_process

STEPS = 4


def train_groups(tmp_path, *, groups: int, ranks: int, recipe: str, options: tuple[str, ...]):
    """``groups`` replica groups of ``ranks`` ranks and, meanwhile, one process on the same
    global batch; returns (the groups' results, the reference's)."""
    lighthouse = start_lighthouse(min_replicas=groups)
    started: list[Group] = []
    try:
        started = start_groups(tmp_path / "ft", lighthouse, groups=groups, ranks=ranks, recipe=recipe,
                               options=options, steps=STEPS)
        reference = train_in_this_process(short_job(recipe, tmp_path / "single", *options, steps=STEPS, lr=1e-2,
                                                    local_batch_size=groups * ranks, checkpoint_interval=STEPS))
        deadline = time.monotonic() + 180
        for group in started:
            group.wait(deadline)
    finally:
        stop_all(started)
        lighthouse.shutdown()
    return [group.result() for group in started], reference


def assert_lockstep(dump, group_losses, reference, steps: int) -> None:
    for losses in group_losses[1:]:
        assert losses == group_losses[0]
    assert_losses_match(reference["losses"], group_losses[0], first_step=1, steps=steps)
    digests = [weight_digests(dump, g) for g in range(len(group_losses))]
    assert steps in digests[0] and all(d == digests[0] for d in digests), digests
    saved = sorted(p.name for p in (dump / "checkpoint").iterdir() if p.name.startswith("step-"))
    assert saved == [f"step-{steps}"]  # one checkpoint for the run, no folder per group
    assert not any((dump / f"replica_{g}" / "checkpoint").exists() for g in range(len(group_losses)))
    # the writer's config beside the checkpoints, where plait convert and generate look for it
    assert json.loads((dump / "config.json").read_text())["torchft"]["replica_group"] == 0


def test_two_fsdp_groups_match_one_process(tmp_path):
    results, reference = train_groups(tmp_path, groups=2, ranks=2, recipe="llama3_debugmodel",
                                      options=("--model.flavor", "debugmodel_tiny"))
    assert_lockstep(tmp_path / "ft", [r["losses"] for r in results], reference, STEPS)


def test_three_groups_match_one_process(one_rank_groups):
    run = one_rank_groups["sync"]  # conftest.py: three groups of one rank
    assert_lockstep(run["dump"], run["losses"], run["reference"], SYNC_STEPS)
