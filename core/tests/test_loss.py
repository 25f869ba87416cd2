"""The chunked token cross-entropy (``plait.nn.loss``) against ``F.cross_entropy`` on an
fp32 copy of the logits, which is what the step computed before it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.memory_watch import MemoryWatch
from plait.nn.loss import IGNORE_INDEX, cross_entropy
from plait.step import token_cross_entropy

ROWS, VOCABULARY = 50, 96


def logits_and_labels(dtype: torch.dtype, *, rows: int = ROWS, vocabulary: int = VOCABULARY,
                      labels_below: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocabulary, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, labels_below or vocabulary, (rows,), generator=generator)
    return logits, labels


def loss_and_grad(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    logits.grad = None
    loss = loss_fn(logits, labels)
    loss.backward()
    return loss.detach(), logits.grad


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def chunk_of(rows: int, vocabulary: int = VOCABULARY) -> int:
    return rows * 4 * vocabulary


@pytest.mark.parametrize("rows_per_chunk", [1, 7, ROWS, 4 * ROWS])  # 7 leaves a last chunk of 1 row
def test_fp32_loss_and_gradient_are_f_cross_entropys(rows_per_chunk):
    logits, labels = logits_and_labels(torch.float32)
    expected, expected_grad = loss_and_grad(reference, logits, labels)
    loss, grad = loss_and_grad(lambda x, y: cross_entropy(x, y, chunk_bytes=chunk_of(rows_per_chunk)), logits, labels)
    assert loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows_per_chunk", [7, ROWS])
def test_bf16_gradient_is_the_fp32_one_rounded_to_bf16(rows_per_chunk):
    """The loss is the fp32 one; the gradient, written in bf16, is the fp32 path's cast to
    bf16, but for a rare element 1 bf16 ulp away (the fp32 softmax is rounded differently
    before the cast: exp(x - lse) against exp((x - max) - log sum))."""
    logits, labels = logits_and_labels(torch.bfloat16, rows=256, vocabulary=2048)
    expected, expected_grad = loss_and_grad(reference, logits, labels)
    chunk = chunk_of(rows_per_chunk, 2048)
    loss, grad = loss_and_grad(lambda x, y: cross_entropy(x, y, chunk_bytes=chunk), logits, labels)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    ulps = (grad.view(torch.int16).int() - expected_grad.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and torch.count_nonzero(ulps) <= 1e-3 * ulps.numel()


def test_padded_ids_are_out_of_the_softmax():
    """Columns 80.. pad the model's vocabulary past the tokenizer's 80 ids: the loss is that
    of the masked logits (before: a -inf copy), and they get a zero gradient."""
    logits, labels = logits_and_labels(torch.float32, labels_below=80)
    masked = lambda x, y: reference(x.masked_fill(torch.arange(VOCABULARY) >= 80, float("-inf")), y)  # noqa: E731
    expected, expected_grad = loss_and_grad(masked, logits, labels)
    loss, grad = loss_and_grad(lambda x, y: cross_entropy(x, y, vocabulary=80, chunk_bytes=chunk_of(7)),
                               logits, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert torch.count_nonzero(grad[:, 80:]) == 0 and torch.count_nonzero(grad[:, :80]) == grad[:, :80].numel()


def test_ignored_labels_are_out_of_the_mean():
    logits, labels = logits_and_labels(torch.float32)
    labels[::3] = IGNORE_INDEX
    expected, expected_grad = loss_and_grad(reference, logits, labels)
    loss, grad = loss_and_grad(lambda x, y: cross_entropy(x, y, chunk_bytes=chunk_of(7)), logits, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert torch.count_nonzero(grad[::3]) == 0


def test_only_the_logits_a_log_sum_exp_per_row_and_the_labels_are_kept_for_the_backward():
    logits, labels = logits_and_labels(torch.bfloat16)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        cross_entropy(logits, labels)
    assert len(saved) == 3
    assert saved[0] is logits and saved[2] is labels
    assert saved[1].dtype == torch.float32 and saved[1].shape == (ROWS,)


def test_fp32_working_memory_is_one_chunk():
    """Peak live bytes of forward + backward above the logits, counted by tensor storage:
    the gradient (in the logits' dtype) and one chunk's fp32 softmax, where
    ``F.cross_entropy(logits.float())`` holds the fp32 copy, log_softmax's output and the
    fp32 gradient at once."""
    logits, labels = logits_and_labels(torch.bfloat16, rows=512, vocabulary=1024)
    logits_bytes, fp32_bytes, chunk = 512 * 1024 * 2, 512 * 1024 * 4, chunk_of(64, 1024)

    def peak(loss_fn) -> int:  # noqa: ANN001
        logits.grad = None
        with MemoryWatch() as watch:
            watch.adopt([logits, labels])
            before = watch.live_bytes
            loss_fn(logits, labels).backward()
        return watch.peak_bytes - before

    chunked = peak(lambda x, y: cross_entropy(x, y, chunk_bytes=chunk))
    assert chunked <= logits_bytes + 2 * chunk + 64 * 512  # + per-row fp32 and int64 vectors
    assert peak(reference) >= logits_bytes + 2 * fp32_bytes


def test_token_cross_entropy_takes_batches_of_sequences_and_the_vocabulary():
    logits, labels = logits_and_labels(torch.float32, labels_below=80)
    expected = cross_entropy(logits, labels, vocabulary=80)
    loss = token_cross_entropy(logits.view(5, 10, VOCABULARY), labels.view(5, 10), vocabulary=80)
    assert torch.equal(loss, expected)


def test_compiled_it_is_the_plain_formula_fused():
    """Under torch.compile the loss is ``F.cross_entropy`` on the fp32 logits, which
    inductor fuses (no chunk loop to unroll): the same loss and, padded ids included,
    gradients within 1 bf16 ulp of eager."""
    logits, labels = logits_and_labels(torch.bfloat16, labels_below=80)
    labels[::5] = IGNORE_INDEX
    loss_fn = lambda x, y: cross_entropy(x, y, vocabulary=80, chunk_bytes=chunk_of(7))  # noqa: E731
    expected, expected_grad = loss_and_grad(loss_fn, logits, labels)
    from torch._inductor.compile_fx import compile_fx

    traced: list[torch.fx.GraphModule] = []

    def inductor(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        traced.append(graph)
        return compile_fx(graph, example_inputs)

    loss, grad = loss_and_grad(torch.compile(loss_fn, backend=inductor, fullgraph=True), logits, labels)
    assert [node.target for node in traced[0].graph.nodes if node.op == "call_function"].count(F.cross_entropy) == 1
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=2**-8, atol=0)
    assert torch.count_nonzero(grad[:, 80:]) == 0
