import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # ft_harness

from ft_harness import SEMISYNC_MODES, SEMISYNC_STEPS, SYNC_EVERY, SYNC_STEPS, Group, job_argv, \
    start_lighthouse, stop_all  # noqa: E402


@pytest.fixture(scope="session")
def one_rank_groups(tmp_path_factory):
    """One launch of three one-rank groups (a process each) for several tests: the three
    train in synchronous mode (and this process, meanwhile, one process on the same global
    batch), then groups 0 and 1 train LocalSGD, then DiLoCo (a lighthouse per run).
    Three process start-ups instead of seven."""
    from plait.testing import JOB_SEPARATOR, short_job, train_in_this_process

    tmp = tmp_path_factory.mktemp("one_rank_groups")
    sync_lighthouse = start_lighthouse(min_replicas=3)
    semisync_lighthouses = [start_lighthouse(min_replicas=2) for _ in SEMISYNC_MODES]
    groups = []
    try:
        for index in range(3):
            jobs = [job_argv(tmp / "sync", sync_lighthouse, index, groups=3, steps=SYNC_STEPS)]
            if index < 2:
                jobs += [job_argv(tmp / mode, lighthouse, index, ("--torchft.mode", mode, "--torchft.sync_every",
                                                                  str(SYNC_EVERY)), steps=SEMISYNC_STEPS)
                         for mode, lighthouse in zip(SEMISYNC_MODES, semisync_lighthouses)]
            argv = [arg for i, job in enumerate(jobs) for arg in ([JOB_SEPARATOR] if i else []) + job]
            groups.append(Group(index, 1, argv, tmp / f"out{index}.json").start())
        reference = train_in_this_process(short_job("tinylm_debug", tmp / "single", steps=SYNC_STEPS, lr=1e-2,
                                                    local_batch_size=3, checkpoint_interval=SYNC_STEPS))
        deadline = time.monotonic() + 180
        for group in groups:
            group.wait(deadline)
    finally:
        stop_all(groups)
        for lighthouse in [sync_lighthouse, *semisync_lighthouses]:
            lighthouse.shutdown()
    results = [json.loads(group.out.read_text()) for group in groups]  # a list of results where several jobs ran
    results[2] = [results[2]]
    runs = {"sync": {"dump": tmp / "sync", "reference": reference,
                     "losses": [{int(s): v for s, v in r[0]["losses"].items()} for r in results]}}
    for job, mode in enumerate(SEMISYNC_MODES, start=1):
        runs[mode] = {"dump": tmp / mode, "losses": [{int(s): v for s, v in r[job]["losses"].items()}
                                                     for r in results[:2]]}
    return runs
