"""The map between data space (values as stored in the shards) and model space, shared by
every objective.

Networks see bounded discrete data in [-1, 1]: spins are already +-1; ``num_levels`` integer
levels 0..k-1 map affinely onto k equally spaced points of [-1, 1]. Continuous data is used
as stored, or through a named invertible transform (:class:`LogLabelFraction`, for energies
that span decades and scale with the label). The VDM's discrete decoder needs the grid of
model-space values and each sample's index into it; a GAN's generator output needs the way
back (a hard decision).
"""

from __future__ import annotations

import math

import torch

from pipeline.data.meta import DataMeta

DATA_KINDS = ("spins", "levels", "continuous")
TRANSFORMS = ("none", "log-label-fraction")


class LogLabelFraction:
    """y = 2 log((x / E + floor) / floor) / log(1 / floor) - 1 per value, E the sample's label.

    For calorimeter deposits x >= 0 (MeV) of a shower of incident energy E: CaloChallenge models
    train on the fractions x / E, log- or logit-transformed (e.g. CaloDiffusion, Amram & Pedro
    2023), because raw deposits span six decades and scale with E. The fraction 0 maps to
    -1 and the fraction 1 - floor to +1; ``floor`` (a fraction of E) sets the resolution
    near 0. The inverse clamps to [0, E) (a deposit is non-negative and below the incident energy)."""

    def __init__(self, floor: float):
        assert 0.0 < floor < 1.0, floor
        self.floor = floor
        self.half_log_range = 0.5 * math.log(1.0 / floor)  # dy/d(log(x / E + floor)) = 1 / this

    @staticmethod
    def _per_sample(labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError("data transform 'log-label-fraction' divides each sample by its label: pass labels")
        e = labels.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        if not bool((e > 0).all()):
            raise ValueError("data transform 'log-label-fraction' needs positive labels (incident energies)")
        return e

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, check: bool) -> torch.Tensor:
        if check and not bool((x >= 0).all()):
            raise ValueError("data transform 'log-label-fraction' needs non-negative values in batch['x'] "
                             "(energy deposits)")
        e = self._per_sample(labels, x)
        return torch.log1p(x / (e * self.floor)) / self.half_log_range - 1.0

    def inverse(self, y: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        e = self._per_sample(labels, y)
        # y > 1 would be a value above its label (a voxel holding more than the incident energy).
        return (torch.expm1((y.clamp(max=1.0) + 1.0) * self.half_log_range) * (e * self.floor)).clamp_min(0.0)

    def empty_value(self) -> float:
        """The model-space image of a stored 0 (an empty voxel), whatever the label: -1."""
        return math.log1p(0.0) / self.half_log_range - 1.0

    def log_abs_det(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Per sample, sum over values of log |dy/dx| = -log((x + E floor) half_log_range)."""
        e = self._per_sample(labels, x)
        return -torch.log((x + e * self.floor) * self.half_log_range).flatten(1).sum(1)


class DataSpace:
    def __init__(self, meta: DataMeta, transform: str = "none", transform_floor: float = 1e-8):
        if meta.data_kind not in DATA_KINDS:
            raise ValueError(f"unknown data_kind {meta.data_kind!r}; allowed: {', '.join(DATA_KINDS)}")
        if meta.data_kind == "levels" and (meta.num_levels is None or meta.num_levels < 2):
            raise ValueError(f"data_kind 'levels' needs num_levels >= 2 in DataMeta, got {meta.num_levels}")
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown data transform {transform!r}; allowed: {', '.join(TRANSFORMS)}")
        if transform != "none" and meta.data_kind != "continuous":
            raise ValueError(f"data transform {transform!r} applies to continuous data, not {meta.data_kind!r}")
        self.kind = meta.data_kind
        self.num_levels = meta.num_levels
        self.transform = LogLabelFraction(transform_floor) if transform == "log-label-fraction" else None

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

    def to_model(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """Stored values -> model space. ``check``: refuse values the data kind cannot hold (a
        mislabelled data set would otherwise train on a silently wrong scale). ``labels``: each
        sample's label, for a transform that scales by it."""
        if self.kind == "spins":
            if check and not bool(((x == 1) | (x == -1)).all()):
                raise ValueError("data_kind 'spins' needs every value of batch['x'] to be +1 or -1")
            return x
        if self.kind == "levels":
            k = self.num_levels
            if check and not bool(((x >= 0) & (x <= k - 1) & (x == x.round())).all()):
                raise ValueError(f"data_kind 'levels' needs integer values 0..{k - 1} in batch['x']")
            return 2 * x / (k - 1) - 1
        return self.transform.forward(x, labels, check) if self.transform is not None else x

    def empty_value(self) -> float:
        """Continuous data: the model-space image of a stored 0 (an empty voxel of sparse data)."""
        if self.kind != "continuous":
            raise ValueError(f"data_kind {self.kind!r} has no empty value: its values are discrete levels")
        return self.transform.empty_value() if self.transform is not None else 0.0

    def log_abs_det(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per sample [B], log |det d(model space)/d(data space)| at stored values ``x``: what turns
        a density of the model-space values into one of the stored values (0 without a transform)."""
        if self.transform is None:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self.transform.log_abs_det(x, labels)

    def value_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of each stored discrete value into :meth:`values`."""
        assert self.kind != "continuous"
        return (x > 0).long() if self.kind == "spins" else x.long()

    def to_data(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Model-space values (e.g. a generator's output) -> data space; discrete data by the
        nearest allowed value (a hard decision)."""
        if self.kind == "spins":
            return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        if self.kind == "levels":
            return ((y + 1.0) * (0.5 * (self.num_levels - 1))).round().clamp(0, self.num_levels - 1)
        return self.transform.inverse(y, labels) if self.transform is not None else y
