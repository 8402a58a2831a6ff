"""Peak bytes of tensor storages alive at once, for the no-N x M-buffer tests of every loss."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, over every op run inside the mode."""

    def __init__(self, exclude=()):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): 0 for t in exclude}  # e.g. the inputs
        self.current = 0
        self.peak = 0

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
