"""The order of the stream's samples as pure functions of (seed, epoch, rank, world_size).

Steps 1-3 of the order in :mod:`pipeline.data.stream`'s docstring: the epoch's shard
permutation, the rank's contiguous slice, and its cut into windows (runs of whole shard
pieces holding at least ``window_samples`` samples) with each window's permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the shard list
    start: int  # first sample index within the shard
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    """Pure functions from (seed, epoch, rank, world_size) to the rank's windows."""

    urls: list[str]
    num_samples: list[int]
    seed: int
    rank: int
    world_size: int
    window_samples: int
    sample_shape: tuple[int, ...]
    label_key: str | None

    @property
    def samples_per_rank(self) -> int:
        return sum(self.num_samples) // self.world_size

    def windows(self, epoch: int) -> list[list[Piece]]:
        return _windows(
            tuple(self.num_samples), self.seed, epoch, self.rank, self.world_size, self.window_samples
        )

    def window_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, window]))
        return rng.permutation(n)

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, offset) of the rank's ``position``-th sample."""
        epoch, q = divmod(position, self.samples_per_rank)
        for w, pieces in enumerate(self.windows(epoch)):
            n = sum(len(p) for p in pieces)
            if q < n:
                return epoch, w, q
            q -= n
        raise AssertionError("position beyond the epoch")


@lru_cache(maxsize=4)
def _windows(num_samples: tuple[int, ...], seed: int, epoch: int, rank: int, world_size: int,
             window_samples: int) -> list[list[Piece]]:
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(num_samples))
    per_rank = sum(num_samples) // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    windows: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    start = 0  # position of the current shard's first sample in the epoch's order
    for s in order:
        n = num_samples[s]
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            current.append(Piece(int(s), a - start, b - start))
            filled += b - a
            if filled >= window_samples:
                windows.append(current)
                current, filled = [], 0
        start += n
        if start >= hi:
            break
    if current:
        windows.append(current)
    return windows
