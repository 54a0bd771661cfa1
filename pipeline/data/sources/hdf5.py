"""HDF5 (and Zarr) datasets read on demand, and the CaloChallenge-layout showers file that
``pipeline shards calo`` writes for it (:mod:`pipeline.physics.calo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import hdf5 as hdf5_io
from pipeline.data.sources.arrays import infer_meta
from pipeline.data.sources.base import SourceData, derived_seed


def hdf5(
    path: str,
    *,
    x_key: str,
    label_key: str | None = None,
    x_shape: tuple[int, ...] | None = None,
    add_channel_dim: bool = False,
    data_kind: str | None = None,
    num_levels: int | None = None,
    label_kind: str | None = None,
    block_bytes: int = hdf5_io.DEFAULT_BLOCK_BYTES,
) -> SourceData:
    """The rows of dataset ``x_key`` of an HDF5 file as samples (each reshaped to ``x_shape``,
    then given a leading channel axis with ``add_channel_dim``), never loaded whole: ``x`` is
    an :class:`~pipeline.data.hdf5.H5Rows` the shard writer reads a group at a time. The
    label ``label_key`` ([N] or [N, 1]) becomes the class (``cls``) or, continuous (the
    default), a json
    field of the same name (CaloChallenge: ``incident_energies``), which ``data.label_key``
    selects; the manifest's info names it."""
    probe = hdf5_io.H5Rows(path, x_key, sample_shape=x_shape, block_bytes=block_bytes)
    sample_shape = ((1,) if add_channel_dim else ()) + probe.sample_shape
    stats = hdf5_io.value_stats(probe)
    labels = hdf5_io.read_labels(path, label_key, len(probe)) if label_key is not None else None
    if labels is not None and label_kind is None:
        # Not inferred: whole-number energies (CaloChallenge dataset 1: powers of two in MeV)
        # would otherwise pass for class indices.
        label_kind = "continuous"
    meta = infer_meta(sample_shape, stats, labels, data_kind=data_kind, num_levels=num_levels,
                       label_kind=label_kind)
    store_dtype = np.int8 if meta.data_kind == "spins" else None
    x = hdf5_io.H5Rows(path, x_key, sample_shape=sample_shape, dtype=store_dtype, block_bytes=block_bytes)
    info: dict[str, Any] = {"hdf5": {"path": str(path), "x_key": x_key, "label_key": label_key,
                                     "row_shape": list(probe.row_shape), "dtype": str(probe.source_dtype),
                                     "attrs": hdf5_io.read_attrs(path)}}
    if meta.label_kind == "class":
        return SourceData(x=x, meta=meta, cls=labels.astype(np.int64), info=info)
    if meta.label_kind == "continuous":
        info["label_json_key"] = label_key
        return SourceData(x=x, meta=meta, json_columns={label_key: labels.astype(np.float64)}, info=info)
    return SourceData(x=x, meta=meta, info=info)


def calo_file(out: str, num_samples: int, *, seed: int, geometry, material, energy_range_mev: tuple[float, float],
              overwrite: bool = False) -> None:
    """Write ``num_samples`` showers of ``pipeline.physics.calo`` at log-uniform incident
    energies to the HDF5 file ``out`` in the CaloChallenge layout (then ``pipeline shards
    hdf5`` shards it). Drawn in fixed chunks of 256 showers from ``SeedSequence([seed, 1])``,
    so the file depends only on the options; the attributes record them (``calo``, JSON)."""
    from pipeline.physics import calo

    if num_samples < 1:
        raise ValueError(f"calo: --num-samples must be >= 1, got {num_samples}")
    if not str(out).endswith((".h5", ".hdf5")):
        raise ValueError(f"calo: --out must be an .h5 or .hdf5 file, got {out}")
    if Path(out).exists() and not overwrite:
        raise ValueError(f"calo: {out} exists; pass --overwrite to replace it")
    rng = np.random.default_rng(derived_seed(seed, 1))
    energies = calo.sample_energies(num_samples, *energy_range_mev, rng)
    calo.longitudinal_params(energies, material)  # energies too low for the profile: error now
    chunk = 256

    def chunks():
        for start in range(0, num_samples, chunk):
            e = energies[start:start + chunk]
            yield calo.simulate(e, geometry, material, rng), e

    hdf5_io.write_calochallenge(
        str(out), chunks(), num_samples=num_samples, num_voxels=geometry.num_voxels,
        attrs={"calo": {**calo.info(geometry, material, *energy_range_mev), "seed": seed}},
    )
