"""Head-tail load balancing: which positions of a sequence each cp rank holds.

Under a causal mask a late query attends to many keys and an early one to few, so cutting
the sequence into cp contiguous shards would give the last rank most of the attention
work. Instead the sequence is cut into ``2 × cp`` equal chunks and rank ``r`` holds chunk
``r`` (its head) followed by chunk ``2 × cp − 1 − r`` (its tail): every rank does the same
work. torch's ring attention assumes exactly this layout when load balancing is on.

Example, 8 positions over 2 ranks: rank 0 holds ``[0, 1, 6, 7]``, rank 1 ``[2, 3, 4, 5]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def check_divisible(seq_len: int, cp_degree: int) -> None:
    if cp_degree < 1 or seq_len % (2 * cp_degree):
        raise ValueError(
            f"head-tail load balancing cuts the sequence into 2 × cp = {2 * cp_degree} equal chunks, "
            f"but the sequence length is {seq_len}"
        )


def head_tail_positions(
    seq_len: int, *, cp_degree: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The positions ``cp_rank`` holds, in its local order: its head chunk, then its tail chunk."""
    check_divisible(seq_len, cp_degree)
    if not 0 <= cp_rank < cp_degree:
        raise ValueError(f"cp rank {cp_rank} is outside 0..{cp_degree - 1}")
    chunk = seq_len // (2 * cp_degree)
    tail_chunk = 2 * cp_degree - 1 - cp_rank
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail = torch.arange(tail_chunk * chunk, (tail_chunk + 1) * chunk, device=device)
    return torch.cat((head, tail))


def head_tail_order(seq_len: int, *, cp_degree: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions of every rank's shard, rank after rank: a permutation of ``0..seq_len-1``
    whose ``r``-th of ``cp_degree`` equal slices is rank ``r``'s shard."""
    return torch.cat(
        [head_tail_positions(seq_len, cp_degree=cp_degree, cp_rank=rank, device=device) for rank in range(cp_degree)]
    )


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``x.index_select(d, order).index_select(d, inverse) == x``.
    Concatenating the shards of all ranks and applying it gives the sequence back."""
    return torch.argsort(order)


@dataclass(frozen=True)
class SequenceShard:
    """One cp rank's share of a sequence: ``take`` cuts it out of any tensor along a dim."""

    seq_len: int
    cp_degree: int
    cp_rank: int
    positions: torch.Tensor
    """Global positions this rank holds, in local order (``head_tail_positions``)."""

    @classmethod
    def head_tail(
        cls, seq_len: int, *, cp_degree: int, cp_rank: int, device: torch.device | str | None = None
    ) -> SequenceShard:
        positions = head_tail_positions(seq_len, cp_degree=cp_degree, cp_rank=cp_rank, device=device)
        return cls(seq_len=seq_len, cp_degree=cp_degree, cp_rank=cp_rank, positions=positions)

    def take(self, tensor: torch.Tensor, *, dim: int) -> torch.Tensor:
        """The rows of ``tensor`` along ``dim`` at this rank's positions. ``tensor`` may be
        longer than the sequence there (a RoPE table sized for the longest sequence the
        model supports), never shorter."""
        if tensor.shape[dim] < self.seq_len:
            raise ValueError(
                f"cannot take a shard of a {self.seq_len}-position sequence from dim {dim} of a "
                f"tensor of shape {tuple(tensor.shape)}: it is shorter than the sequence"
            )
        return tensor.index_select(dim, self.positions.to(tensor.device))
