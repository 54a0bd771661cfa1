"""What every source returns (:class:`SourceData`) and how sources derive their seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.meta import DataMeta


@dataclass
class SourceData:
    # [N, *sample_shape]: an array, or an array-like read on demand (hdf5.H5Rows: len, shape,
    # dtype, x[i] and x[indices]) for data larger than memory.
    x: np.ndarray
    meta: DataMeta
    cls: np.ndarray | None = None  # [N] integer class indices, stored as the sample's "cls"
    # Per-sample metadata written to the sample's "json": column name -> array [N].
    json_columns: dict[str, np.ndarray] = field(default_factory=dict)
    # Extra, source-specific facts recorded in the manifest (e.g. mixture parameters).
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        assert tuple(self.x.shape[1:]) == tuple(self.meta.sample_shape), (self.x.shape, self.meta)
        assert self.cls is None or self.cls.shape == (n,)
        assert all(len(v) == n for v in self.json_columns.values())


def derived_seed(seed: int, *path: int) -> int:
    """A 32-bit seed derived from ``seed`` and a path, independent across paths (SeedSequence)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])
