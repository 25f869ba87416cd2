"""Token cross-entropy a chunk of rows at a time.

``F.cross_entropy(logits.float(), labels)`` holds several fp32 logits-sized buffers at
once: the cast, log_softmax's output (saved for the backward), its gradient, and, with a
padded vocabulary, a masked copy (4 GiB each at 8K tokens of a 128K vocabulary). Here the
forward keeps only the logits as they came, one fp32 log-sum-exp per row and the labels;
the fp32 softmax of a chunk of rows is built in the forward and again in the backward,
which writes ``(softmax - onehot) * grad / count`` straight into a gradient of the logits'
dtype. Only one chunk's fp32 copy is alive at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: labels equal to this are left out of the loss and of its mean (``F.cross_entropy``'s default)
IGNORE_INDEX = -100

#: fp32 working memory per chunk of rows. CPU: chunks about the size of a core's cache
#: are the fastest (forward + backward of 4,096 x 128,256 bf16 logits, one thread:
#: 1.73 s at 2 MiB, 1.78 s at 1 MiB, 1.86 s at 8 MiB, 2.26 s at 32 MiB; at 2,048 x 2,048
#: within 10 % from 0.5 to 16 MiB; docs/performance.md, "the loss"). An accelerator
#: launches several kernels per chunk, so there chunks are larger (16 at 8K tokens of a
#: 128K vocabulary); not measured yet.
CHUNK_BYTES = {"cpu": 2 << 20}
ACCELERATOR_CHUNK_BYTES = 256 << 20


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, vocabulary: int | None = None,
                  chunk_bytes: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``logits`` ``[N, V]`` (any float dtype; computed in fp32)
    against ``labels`` ``[N]``, over the labels that are not ``IGNORE_INDEX``: the value and
    gradient of ``F.cross_entropy(logits.float(), labels)``, the gradient in the logits'
    dtype. Ids ``>= vocabulary`` (columns that pad the model's vocabulary past the
    tokenizer's) are outside the softmax and get a zero gradient.

    Under ``torch.compile`` it is that formula itself: inductor fuses it into kernels that
    keep no fp32 copy either (and would unroll the chunks' loop)."""
    vocabulary = logits.shape[-1] if vocabulary is None else min(vocabulary, logits.shape[-1])
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits[:, :vocabulary].float(), labels, ignore_index=IGNORE_INDEX)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(logits.device.type, ACCELERATOR_CHUNK_BYTES)
    rows = max(1, chunk_bytes // (4 * vocabulary))
    return _ChunkedCrossEntropy.apply(logits, labels, vocabulary, rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocabulary: int,  # noqa: ANN001
                rows: int) -> torch.Tensor:
        log_sum_exp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows, :vocabulary].to(torch.float32, copy=True)
            row_max = chunk.amax(dim=-1, keepdim=True)
            log_sum_exp[start:start + rows] = chunk.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(-1))
        counted = labels != IGNORE_INDEX
        target_logits = logits.gather(1, torch.where(counted, labels, 0).unsqueeze(1)).squeeze(1).float()
        losses = torch.where(counted, log_sum_exp - target_logits, 0.0)
        ctx.save_for_backward(logits, log_sum_exp, labels)
        ctx.vocabulary, ctx.rows = vocabulary, rows
        return losses.sum() / counted.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        logits, log_sum_exp, labels = ctx.saved_tensors
        vocabulary, rows = ctx.vocabulary, ctx.rows
        counted = labels != IGNORE_INDEX
        # per row: grad / count, or 0 for an ignored label (then no column is the target)
        weights = torch.where(counted, grad_loss.float() / counted.sum(), 0.0).unsqueeze(1)
        targets = torch.where(counted, labels, 0).unsqueeze(1)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if vocabulary < logits.shape[-1]:
            grad[:, vocabulary:] = 0
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            chunk = logits[start:end, :vocabulary].to(torch.float32, copy=True)
            softmax = chunk.sub_(log_sum_exp[start:end].unsqueeze(1)).exp_().mul_(weights[start:end])
            softmax.scatter_add_(1, targets[start:end], -weights[start:end])
            grad[start:end, :vocabulary] = softmax
        return grad, None, None, None
