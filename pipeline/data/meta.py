"""What a model needs to know about its data, read from a shard set's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.errors import ConfigError

BOUNDARIES = ("periodic", "open")


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
    # (min, max) of continuous labels too many to list (> 256 distinct: incident energies),
    # so that a model can standardise them; None when label_values lists them or unknown.
    label_range: tuple[float, float] | None = None
    # Boundary conditions of a lattice / grid sample: "periodic" (a torus: Ising with periodic
    # boundaries, GRFs drawn by FFT), "open" (the array's edges are real edges: images), or
    # None when the source does not say (every manifest written before this field existed,
    # and non-lattice data such as points). A model may read it to choose circular or zero
    # padding; None leaves that choice to the model's own config.
    boundary: Literal["periodic", "open"] | None = None

    def __post_init__(self) -> None:
        if self.boundary is not None and self.boundary not in BOUNDARIES:
            raise ConfigError(f"data meta boundary={self.boundary!r} is not allowed; "
                              f"use one of {', '.join(map(repr, BOUNDARIES))} or None (unknown)")


def meta_to_dict(meta: DataMeta) -> dict[str, Any]:
    """``meta`` as JSON-ready values (lists for tuples): the ``meta`` of a shard manifest."""
    d = asdict(meta)
    d["sample_shape"] = list(meta.sample_shape)
    if meta.label_values is not None:
        d["label_values"] = list(meta.label_values)
    if meta.label_range is not None:
        d["label_range"] = list(meta.label_range)
    return d


def meta_from_dict(d: dict[str, Any]) -> DataMeta:
    """The inverse of :func:`meta_to_dict` (a TypeError for unknown or missing fields)."""
    d = dict(d)
    d["sample_shape"] = tuple(d["sample_shape"])
    if d.get("label_values") is not None:
        d["label_values"] = tuple(float(v) for v in d["label_values"])
    if d.get("label_range") is not None:
        d["label_range"] = tuple(float(v) for v in d["label_range"])
    return DataMeta(**d)
