"""Live tensor memory on the CPU, counted at the storage level, to check the planner's
predictions against what a real training step holds (torch has no CPU allocator statistics).

    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())   # tensors made before the mode started
        step()
    mem.peak                                 # bytes
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Every storage an op creates is counted once until it is freed (weakref finalizer on the
    storage object, which torch keeps alive exactly as long as the storage)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._storages or storage.device.type != "cpu":
            return
        self._storages.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def track_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.track(tensor)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int, size: int) -> None:
        self._storages.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out
