"""The map between data space (values as stored in the shards) and model space, shared by
every objective.

Networks see bounded discrete data in [-1, 1]: spins are already +-1; ``num_levels`` integer
levels 0..k-1 map affinely onto k equally spaced points of [-1, 1]. Continuous data is used
as stored. The VDM's discrete decoder needs the grid of model-space values and each
sample's index into it; a GAN's generator output needs the way back (a hard decision).
"""

from __future__ import annotations

import torch

from pipeline.data.meta import DataMeta

DATA_KINDS = ("spins", "levels", "continuous")


class DataSpace:
    def __init__(self, meta: DataMeta):
        if meta.data_kind not in DATA_KINDS:
            raise ValueError(f"unknown data_kind {meta.data_kind!r}; allowed: {', '.join(DATA_KINDS)}")
        if meta.data_kind == "levels" and (meta.num_levels is None or meta.num_levels < 2):
            raise ValueError(f"data_kind 'levels' needs num_levels >= 2 in DataMeta, got {meta.num_levels}")
        self.kind = meta.data_kind
        self.num_levels = meta.num_levels

    @property
    def bounded(self) -> bool:
        """Discrete data lives in [-1, 1] in model space (a GAN's tanh output range)."""
        return self.kind != "continuous"

    def values(self) -> torch.Tensor | None:
        """The model-space values discrete data can take (None for continuous data)."""
        if self.kind == "spins":
            return torch.tensor([-1.0, 1.0])
        if self.kind == "levels":
            return torch.linspace(-1.0, 1.0, self.num_levels)
        return None

    def to_model(self, x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Stored values -> model space. ``check``: refuse values the data kind cannot hold (a
        mislabelled data set would otherwise train on a silently wrong scale)."""
        if self.kind == "spins":
            if check and not bool(((x == 1) | (x == -1)).all()):
                raise ValueError("data_kind 'spins' needs every value of batch['x'] to be +1 or -1")
            return x
        if self.kind == "levels":
            k = self.num_levels
            if check and not bool(((x >= 0) & (x <= k - 1) & (x == x.round())).all()):
                raise ValueError(f"data_kind 'levels' needs integer values 0..{k - 1} in batch['x']")
            return 2 * x / (k - 1) - 1
        return x

    def value_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of each stored discrete value into :meth:`values`."""
        assert self.kind != "continuous"
        return (x > 0).long() if self.kind == "spins" else x.long()

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space values (e.g. a generator's output) -> data space; discrete data by the
        nearest allowed value (a hard decision)."""
        if self.kind == "spins":
            return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        if self.kind == "levels":
            return ((y + 1.0) * (0.5 * (self.num_levels - 1))).round().clamp(0, self.num_levels - 1)
        return y
