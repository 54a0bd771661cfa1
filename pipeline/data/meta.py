"""What a model needs to know about its data, read from a shard set's manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DataMeta:
    sample_shape: tuple[int, ...]  # shape of one sample's "x", e.g. (1, 16, 16) or (2,)
    # spins: values in {-1, +1}; levels: integers 0..num_levels-1 (k-bit images, digits);
    # continuous: real values.
    data_kind: Literal["spins", "levels", "continuous"]
    num_levels: int | None = None  # for data_kind == "levels"
    # Conditioning label carried in batch["label"]: none, a class index (long) or a real
    # value such as a temperature (float).
    label_kind: Literal["none", "class", "continuous"] = "none"
    num_classes: int | None = None  # for label_kind == "class"
    label_values: tuple[float, ...] | None = None  # distinct continuous labels (e.g. temperatures)
