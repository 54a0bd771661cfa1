"""The GAN's map between data space and model space (:class:`_DataMap`).

G's tanh output and D's inputs live in [-1, 1] for bounded data; this maps samples there and
back. Kept apart (and private) because it is to be merged with the VDM's equivalent.
"""

from __future__ import annotations

import torch

from pipeline.data.meta import DataMeta


class _DataMap:
    """Spins are already +-1; levels 0..L-1 map affinely onto [-1, 1]; continuous as is."""

    def __init__(self, meta: DataMeta):
        self.kind = meta.data_kind
        self.num_levels = meta.num_levels
        if self.kind == "levels" and (self.num_levels is None or self.num_levels < 2):
            raise ValueError(f"data_kind 'levels' needs num_levels >= 2, got {self.num_levels}")

    @property
    def bounded(self) -> bool:
        return self.kind in ("spins", "levels")

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "levels":
            return x * (2.0 / (self.num_levels - 1)) - 1.0
        return x

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space generator output -> data space (a hard decision for discrete data)."""
        if self.kind == "spins":
            return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        if self.kind == "levels":
            return ((y + 1.0) * (0.5 * (self.num_levels - 1))).round().clamp(0, self.num_levels - 1)
        return y
