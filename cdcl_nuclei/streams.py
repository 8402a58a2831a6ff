"""Where a training epoch's randomness comes from: a seed that depends only on (seed, epoch, rank),
so a resumed run draws what an uninterrupted one would, and the endless index streams the batches
are drawn from."""
from __future__ import annotations

import torch


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101) % (2 ** 63)


class IndexStream:
    """Endless stream of indices: seeded permutations of `pool` one after another."""

    def __init__(self, pool, g: torch.Generator):
        self.pool, self.g, self.buf = list(pool), g, []

    def take(self, n: int) -> list:
        while len(self.buf) < n:
            self.buf += [self.pool[i] for i in torch.randperm(len(self.pool), generator=self.g).tolist()]
        out, self.buf = self.buf[:n], self.buf[n:]
        return out
