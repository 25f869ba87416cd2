"""Counting the bytes of live tensors while code runs, on any device, fake tensors included.

``MemoryWatch`` is a dispatch mode: every tensor an operator returns is charged to the
storage it lives in, once, until that storage is freed. With ``FakeTensorMode`` below it,
a forward and backward of a model far larger than this machine costs no memory at all,
yet the peak it reports is the peak the real run would allocate (activations, saved
tensors, gathered parameters, gradients), minus allocator fragmentation and the buffers
that collectives allocate inside their own kernels.

Storages resized in place (FSDP frees a gathered parameter with ``resize_(0)`` and
gathers into the same storage again) are followed through ``UntypedStorage.resize_``,
which the watch wraps while it is active.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's bytes are those of its local shard."""
    local = getattr(tensor, "_local_tensor", None)
    return local if local is not None else tensor


class MemoryWatch(TorchDispatchMode):
    """``with MemoryWatch() as watch: ...`` then ``watch.peak_bytes``.

    ``adopt(tensors)`` charges tensors that existed before (parameters), so that the peak
    includes them; ``reset_peak()`` starts a new peak from the current live bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, tuple[weakref.ref, int]] = {}
        self._original_resize: Any = None

    def adopt(self, tensors: Any) -> None:
        for tensor in tensors:
            self._charge(_local(tensor).untyped_storage())

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _tracked(self, storage: torch.UntypedStorage) -> int | None:
        """The bytes charged for ``storage``, or None if it is not tracked."""
        known = self._storages.get(id(storage))
        return known[1] if known is not None and known[0]() is storage else None

    def _charge(self, storage: torch.UntypedStorage) -> None:
        if self._tracked(storage) is not None:
            return
        key = id(storage)
        self._storages[key] = (weakref.ref(storage, lambda _ref, key=key: self._release(key)), storage.nbytes())
        self._add(storage.nbytes())

    def _add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        _ref, nbytes = self._storages.pop(key)
        self.live_bytes -= nbytes

    def _resized(self, storage: torch.UntypedStorage) -> None:
        charged = self._tracked(storage)
        if charged is None:
            self._charge(storage)
            return
        self._storages[id(storage)] = (self._storages[id(storage)][0], storage.nbytes())
        self._add(storage.nbytes() - charged)

    def __enter__(self) -> "MemoryWatch":
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            self._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        del torch.UntypedStorage.resize_  # uncovers the inherited method again
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._charge(_local(value).untyped_storage())
        return out
