"""Data sources: each turns its options into arrays held in memory, ready to be sharded.

A source returns :class:`SourceData`: the samples ``x`` [N, *sample_shape], optional class
indices, per-sample JSON metadata columns and the :class:`DataMeta` a model needs. The data
sets this project generates (Ising lattices, digits, mixtures, fields) fit in memory, so a
source is a plain function rather than a streaming reader; only HDF5 files, which may be
larger than memory, hand the writer an ``x`` that reads its rows on demand (``hdf5.py``).

One module per source family (``ising``, ``digits``, ``gmm``, ``fields``: GRF and phi^4,
``arrays``: npy and Hugging Face, ``hdf5``: HDF5/Zarr and the calorimeter file), all
re-exported here: callers write ``sources.ising(...)``. A new source is a function in the
module of its family (or a new module, re-exported below) and a subcommand in
``pipeline/data/cli.py``.
"""

from __future__ import annotations

from pipeline.data.sources.arrays import _from_arrays, hf, infer_meta, npy  # noqa: F401  (_from_arrays: tests)
from pipeline.data.sources.base import SourceData, derived_seed
from pipeline.data.sources.digits import digits
from pipeline.data.sources.fields import grf, phi4
from pipeline.data.sources.gmm import gmm, gmm_log_prob, gmm_params
from pipeline.data.sources.hdf5 import calo_file, hdf5
from pipeline.data.sources.ising import ising

__all__ = ["SourceData", "calo_file", "derived_seed", "digits", "gmm", "gmm_log_prob", "gmm_params", "grf", "hdf5",
           "hf", "infer_meta", "ising", "npy", "phi4"]
