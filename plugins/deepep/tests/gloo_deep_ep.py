"""DeepEP's ``Buffer`` API over torch.distributed all-to-alls: the fake backend the CPU
tests run the DeepEP dispatcher on. Same contract as ``deep_ep.Buffer`` in normal
(non-low-latency) mode: each token travels once to every rank that holds one of its
experts, arrives with its expert ids made local (``-1`` for experts elsewhere), and
``combine`` sums the returned tokens without weights. Any dtype; no events to wait for."""
from __future__ import annotations

import torch
import torch.distributed as dist


class DoneEvent:
    """A finished ``EventOverlap``."""

    def current_stream_wait(self) -> None:
        pass


class GlooDeepEPBuffer:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.combines = 0
        self.async_combines = 0

    def _all_to_all(self, rows: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                               group=self.group)
        return out

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, **_options):
        local_experts = num_experts // self.ranks
        in_rank = torch.zeros(topk_idx.shape[0], self.ranks, dtype=torch.bool)
        valid = topk_idx >= 0
        in_rank[valid.nonzero(as_tuple=True)[0], topk_idx[valid] // local_experts] = True
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        return in_rank.sum(dim=0).int(), None, per_expert, in_rank, DoneEvent()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None, **_options):
        if handle is not None:  # cached layout: move x the same way again
            send_index, send, receive, _tokens = handle
            return self._all_to_all(x[send_index], send, receive), None, None, None, None, DoneEvent()
        local_experts = num_tokens_per_expert.shape[0] // self.ranks
        per_rank = [is_token_in_rank[:, rank].nonzero(as_tuple=True)[0] for rank in range(self.ranks)]
        send_index = torch.cat(per_rank)
        send = [len(tokens) for tokens in per_rank]
        receive_counts = torch.empty(self.ranks, dtype=torch.int64)
        dist.all_to_all_single(receive_counts, torch.tensor(send, dtype=torch.int64), group=self.group)
        receive = receive_counts.tolist()
        local_ids = torch.cat([
            torch.where(topk_idx[tokens] // local_experts == rank, topk_idx[tokens] % local_experts, -1)
            for rank, tokens in enumerate(per_rank)
        ])  # fmt: skip
        received_ids = self._all_to_all(local_ids, send, receive)
        counts = torch.bincount(received_ids[received_ids >= 0], minlength=local_experts).tolist()
        handle = (send_index, send, receive, x.shape[0])
        return (self._all_to_all(x[send_index], send, receive), received_ids,
                self._all_to_all(topk_weights[send_index], send, receive), counts, handle, DoneEvent())

    def combine(self, x, handle, topk_weights=None, async_finish=False, **_options):
        send_index, send, receive, tokens = handle
        self.combines += 1
        self.async_combines += int(async_finish)

        def home(rows: torch.Tensor) -> torch.Tensor:
            back = self._all_to_all(rows, receive, send)
            return back.new_zeros((tokens, *back.shape[1:])).index_add(0, send_index, back)

        return home(x), None if topk_weights is None else home(topk_weights), DoneEvent()
