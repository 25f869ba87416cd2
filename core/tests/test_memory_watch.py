"""MemoryWatch charges every storage once, from its creation until it is freed or resized."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from plait.memory_watch import MemoryWatch

FLOAT = 4


def test_views_share_their_storage_and_temporaries_are_released():
    with MemoryWatch() as watch:
        kept = torch.empty(1000)
        view = kept.view(10, 100)
        scaled = torch.ones(500) * 2  # the ones() temporary dies at once
        assert watch.live_bytes == (1000 + 500) * FLOAT
        assert watch.peak_bytes == (1000 + 500 + 500) * FLOAT
        del scaled
        assert watch.live_bytes == 1000 * FLOAT
    assert view.shape == (10, 100)


def test_saved_tensors_and_gradients_are_counted():
    with MemoryWatch() as watch:
        x = torch.randn(100, 100, requires_grad=True)
        y = (x @ x).relu().sum()  # relu keeps its output for backward; the mm output is freed
        assert watch.live_bytes == 2 * 100 * 100 * FLOAT + FLOAT
        y.backward()
        assert x.grad is not None
        assert watch.live_bytes == 2 * 100 * 100 * FLOAT + FLOAT  # x, x.grad, y


def test_in_place_resize_is_followed():
    with MemoryWatch() as watch:
        buffer = torch.empty(1000)
        buffer.untyped_storage().resize_(0)  # how FSDP frees a gathered parameter
        assert watch.live_bytes == 0
        buffer.untyped_storage().resize_(1000 * FLOAT)
        assert watch.live_bytes == watch.peak_bytes == 1000 * FLOAT
    assert "resize_" not in torch.UntypedStorage.__dict__  # the wrapper is gone


def test_adopted_tensors_count_from_the_start_and_reset_peak_keeps_them():
    existing = torch.empty(250)
    with MemoryWatch() as watch:
        watch.adopt([existing, existing[:10]])
        assert watch.live_bytes == 250 * FLOAT
        torch.empty(1000)
        watch.reset_peak()
        assert watch.peak_bytes == 250 * FLOAT


def test_fake_tensors_measure_like_real_ones():
    def step() -> int:
        with MemoryWatch() as watch:
            layer = torch.nn.Linear(64, 32)
            x = torch.randn(16, 64)
            layer(x).square().mean().backward()
            return watch.peak_bytes

    with FakeTensorMode():
        fake = step()
    assert fake == step() > 0
