"""LocalSGD and DiLoCo: the arithmetic with two replica groups simulated in one process
(``average`` is the mean over both groups' tensors, as torchft's allreduce computes it),
then both modes in real runs of two groups (the one-rank launch of conftest.py)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from ft_harness import SEMISYNC_MODES, SEMISYNC_STEPS, SYNC_EVERY, weight_digests
from plait_torchft.semisync import SemiSync


def two_groups(mode: str, **options):
    params = [[nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))] for _ in range(2)]
    defaults = dict(sync_every=2, fragments=1, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True)
    return params, [SemiSync(group, mode=mode, **{**defaults, **options}) for group in params]


def meet(syncs, fragment: int, commit: bool = True) -> None:
    """Both groups meet, each in its own thread as in a run: ``average`` waits for the
    other group's tensors and replaces its own by the mean."""
    barrier = threading.Barrier(2)
    sent: list[list[torch.Tensor]] = []
    results = []

    def run(index: int) -> None:
        def average(tensors: list[torch.Tensor]) -> None:
            sent.append(tensors)
            barrier.wait()
            other = next(t for t in sent if t is not tensors)
            means = [(a + b) / 2 for a, b in zip(tensors, other)]
            barrier.wait()
            for tensor, mean in zip(tensors, means):
                tensor.copy_(mean)

        results.append(syncs[index].sync(fragment, average, lambda: commit))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [commit, commit]


def test_diloco_outer_steps_match_a_hand_computation():
    params, syncs = two_groups("diloco")
    lr, momentum = 0.7, 0.9
    original = torch.tensor([1.0, 2.0, 3.0])
    buffer = torch.zeros(3)
    for local_moves in ([[0.2, -0.4, 1.0], [0.6, 0.0, -0.2]], [[-0.1, 0.3, 0.5], [0.3, 0.1, 0.1]]):
        with torch.no_grad():  # each group's inner steps moved its parameters
            for group, move in zip(params, local_moves):
                flat = torch.cat([p.detach() for p in group]) + torch.tensor(move)
                group[0].copy_(flat[:2])
                group[1].copy_(flat[2:])
        meet(syncs, 0)
        # by hand: pseudo-gradient = original - mean(local); Nesterov SGD on the original
        local_mean = original + (torch.tensor(local_moves[0]) + torch.tensor(local_moves[1])) / 2
        gradient = original - local_mean
        buffer = momentum * buffer + gradient
        original = original - lr * (gradient + momentum * buffer)
        for group in params:
            torch.testing.assert_close(torch.cat([p.detach() for p in group]), original, rtol=0, atol=1e-6)


def test_local_sgd_averages_and_a_discarded_meeting_keeps_local_parameters():
    params, syncs = two_groups("local_sgd")
    with torch.no_grad():
        params[1][0].add_(1.0)
    meet(syncs, 0, commit=False)
    assert not torch.equal(params[0][0], params[1][0])
    meet(syncs, 0)
    for a, b in zip(params[0], params[1]):
        assert torch.equal(a, b)
    torch.testing.assert_close(params[0][0].detach(), torch.tensor([1.5, 2.5]))


def test_fragments_meet_at_their_own_steps():
    _, syncs = two_groups("diloco", sync_every=4, fragments=2)
    assert [syncs[0].due(step) for step in range(1, 9)] == [[], [0], [], [1], [], [0], [], [1]]
    assert [len(fragment) for fragment in syncs[0].fragments] == [1, 1]


@pytest.mark.parametrize("mode", SEMISYNC_MODES)
def test_groups_hold_equal_parameters_after_each_sync(one_rank_groups, mode):
    run = one_rank_groups[mode]  # conftest.py: groups 0 and 1 of the one-rank launch
    digests = [weight_digests(run["dump"], g, "sync") for g in (0, 1)]
    assert sorted(digests[0]) == sorted(digests[1]) == list(range(SYNC_EVERY, SEMISYNC_STEPS + 1, SYNC_EVERY))
    assert digests[0] == digests[1]
    assert len(set(digests[0].values())) == len(digests[0])  # the parameters moved between syncs
    assert run["losses"][0][1] != run["losses"][1][1]  # each group trained its own shard in between
