"""Where an objective's random numbers come from: a generator, or each sample's own stream.

:class:`GeneratorDraws` draws a whole batch from one ``torch.Generator`` (None: the global
RNG), as a benchmark that holds the noise fixed needs. :class:`SampleDraws` gives every
sample a stream of its own, keyed by (seed, purpose, the sample's global position in the
data order): the same sample at the same place of the order then gets the same noise
whatever the world size, the rank it lands on or the split of the global batch into
micro steps, so a run resumed onto another number of processes draws what the
uninterrupted run would have drawn (the data-at-scale issue's elastic resume). A sample's
k-th draw is its k-th call's slice, so objectives must draw in a fixed order per forward.

Cost: one ``torch.Generator`` per sample and call site per micro step (~10 us each), small
against a network evaluation.
"""

from __future__ import annotations

from typing import Protocol, Union

import numpy as np
import torch


class Draws(Protocol):
    def normal(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """Standard normal draws of ``shape`` (``shape[0]`` is the batch)."""
        ...

    def uniform(self, n: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """``n`` (= the batch size) U[0, 1) draws."""
        ...


class GeneratorDraws:
    """Whole-batch draws from ``generator`` (None: the global RNG)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def normal(self, shape, device):
        return torch.randn(shape, device=device, generator=self.generator)

    def uniform(self, n, device, dtype):
        return torch.rand(n, device=device, generator=self.generator, dtype=dtype)


class SampleDraws:
    """Per-sample streams keyed by (seed, purpose, global position). Drawn on the CPU, where
    generators are cheap and identical on every machine, then moved to ``device``."""

    def __init__(self, seed: int, purpose: int, positions: torch.Tensor):
        assert positions.dim() == 1 and not positions.dtype.is_floating_point, positions
        self._gens = [torch.Generator().manual_seed(sample_key(seed, purpose, int(p))) for p in positions.tolist()]

    def normal(self, shape, device):
        assert shape[0] == len(self._gens), (shape, len(self._gens))
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self._gens]).to(device)

    def uniform(self, n, device, dtype):
        assert n == len(self._gens), (n, len(self._gens))
        return torch.stack([torch.rand((), generator=g, dtype=dtype) for g in self._gens]).to(device)


AnyDraws = Union[Draws, torch.Generator, None]


def as_draws(source: AnyDraws) -> Draws:
    """A generator (or None, the global RNG) as :class:`GeneratorDraws`; draws as they are."""
    if source is None or isinstance(source, torch.Generator):
        return GeneratorDraws(source)
    return source


def sample_key(seed: int, purpose: int, position: int) -> int:
    """A 63-bit seed for (seed, purpose, position), decorrelated by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, purpose, position]).generate_state(1, np.uint64)[0] >> np.uint64(1))
