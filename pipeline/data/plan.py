"""The global order of the stream's samples, and which positions of it a rank takes.

Steps 1-3 of the order in :mod:`pipeline.data.stream`'s docstring are pure functions of
(seed, epoch) - :class:`Plan`: the epoch's shard permutation, its cut into global windows
(runs of whole shard pieces holding at least ``window_samples`` samples) and each window's
permutation. Step 4, which global positions a rank takes, is :class:`Layout`, a pure function
of (start, rank, world_size, batch_per_rank). Neither depends on the number of workers.
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
    """Pure functions from (seed, epoch) to the epoch's global windows."""

    urls: list[str]
    num_samples: list[int]  # per shard
    seed: int
    window_samples: int
    sample_shape: tuple[int, ...]
    label_key: str | None

    @property
    def samples_per_epoch(self) -> int:
        """N: every sample once per epoch, nothing dropped (all ranks together)."""
        return sum(self.num_samples)

    def windows(self, epoch: int) -> list[list[Piece]]:
        return _windows(tuple(self.num_samples), self.seed, epoch, self.window_samples)

    def window_starts(self, epoch: int) -> np.ndarray:
        """Offset within the epoch of each window's first slot, then N: [num_windows + 1]."""
        return _window_starts(tuple(self.num_samples), self.seed, epoch, self.window_samples)

    def window_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        # The 0 is where the per-rank order had its rank: the 1-process order is bitwise the
        # order of the per-rank layout it replaces (tests/golden keeps its 1-process cases).
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0, window]))
        return rng.permutation(n)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, window) of global ``position``: epoch ``position // N``, then the window
        holding offset ``position % N``."""
        epoch, q = divmod(position, self.samples_per_epoch)
        starts = self.window_starts(epoch)
        return epoch, int(np.searchsorted(starts, q, side="right")) - 1


@dataclass(frozen=True)
class Layout:
    """Which global positions a rank takes, from global position ``start`` on: its k-th micro
    batch is ``start + k*W*B + r*B + [0, B)``. So micro step a of optimizer step s (A micro
    steps) on rank r is offset ``(a*W + r)*B`` of the global batch ``[s*G, (s+1)*G)``,
    ``G = W*A*B``: the split of G into ranks x micro steps changes who decodes a sample, never
    which samples form a step or their order (micro step-major, rank-minor)."""

    start: int
    rank: int
    world_size: int
    batch_per_rank: int

    def owns(self, positions: np.ndarray) -> np.ndarray:
        """Mask of the global ``positions`` that this rank takes."""
        rel = positions - self.start
        return (rel >= 0) & ((rel // self.batch_per_rank) % self.world_size == self.rank)

    def position(self, j: int) -> int:
        """Global position of this rank's ``j``-th sample."""
        k, i = divmod(j, self.batch_per_rank)
        return self.start + (k * self.world_size + self.rank) * self.batch_per_rank + i


@lru_cache(maxsize=8)
def _windows(num_samples: tuple[int, ...], seed: int, epoch: int, window_samples: int) -> list[list[Piece]]:
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(num_samples))
    windows: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for s in order:
        n = num_samples[s]
        if n == 0:
            continue
        current.append(Piece(int(s), 0, n))
        filled += n
        if filled >= window_samples:
            windows.append(current)
            current, filled = [], 0
    if current:
        windows.append(current)
    return windows


@lru_cache(maxsize=8)
def _window_starts(num_samples: tuple[int, ...], seed: int, epoch: int, window_samples: int) -> np.ndarray:
    sizes = [sum(len(p) for p in w) for w in _windows(num_samples, seed, epoch, window_samples)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
