"""Data sources: each turns its options into arrays held in memory, ready to be sharded.

A source returns :class:`SourceData`: the samples ``x`` [N, *sample_shape], optional class
indices, per-sample JSON metadata columns and the :class:`DataMeta` a model needs. The data
sets this project generates (Ising lattices, digits, mixtures, fields) fit in memory, so a
source is a plain function rather than a streaming reader; only HDF5 files, which may be
larger than memory, hand the writer an ``x`` that reads its rows on demand (``hdf5.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import hdf5 as hdf5_io
from pipeline.data.hdf5 import ValueStats
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


def _derived_seed(seed: int, *path: int) -> int:
    """A 32-bit seed derived from ``seed`` and a path, independent across paths (SeedSequence)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


# --------------------------------------------------------------------------------- Ising


def _ising_one(args: tuple[float, int, int, int]) -> np.ndarray:
    # Imported lazily: the physics module is heavy-ish and only this source needs it.
    from pipeline.physics.ising import sample_ising

    temperature, size, num_samples, seed = args
    return sample_ising(temperature, size, num_samples, seed=seed)


def ising(
    temperatures: list[float], size: int, num_samples: int, *, seed: int, workers: int = 1
) -> SourceData:
    """``num_samples`` equilibrium L x L lattices per temperature, stored channel-first int8
    [1, L, L] with values +1/-1. Temperature ``t_i`` uses seed ``SeedSequence([seed, i])``."""
    if not temperatures:
        raise ValueError("ising: give at least one --temperature")
    if any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise ValueError(f"ising: temperatures must be finite and > 0, got {temperatures}")
    if len(set(temperatures)) != len(temperatures):
        raise ValueError(f"ising: temperatures must be distinct, got {temperatures}")
    if size < 2:
        raise ValueError(f"ising: --size must be >= 2, got {size}")
    if num_samples < 1:
        raise ValueError(f"ising: --num-samples must be >= 1, got {num_samples}")
    seeds = [_derived_seed(seed, i) for i in range(len(temperatures))]
    jobs = [(float(t), size, num_samples, s) for t, s in zip(temperatures, seeds)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            lattices = list(pool.map(_ising_one, jobs))
    else:
        lattices = [_ising_one(j) for j in jobs]
    for t, lat in zip(temperatures, lattices):
        if lat.shape != (num_samples, size, size) or not np.isin(lat, (-1, 1)).all():
            raise RuntimeError(f"sample_ising({t}, {size}, {num_samples}) returned a wrong array")
    x = np.concatenate(lattices).astype(np.int8)[:, None]  # [N, 1, L, L], channel-first
    n_t = len(temperatures)
    several = n_t > 1
    meta = DataMeta(
        sample_shape=(1, size, size),
        data_kind="spins",
        label_kind="continuous" if several else "none",
        label_values=tuple(sorted(float(t) for t in temperatures)) if several else None,
    )
    return SourceData(
        x=x,
        meta=meta,
        json_columns={
            "temperature": np.repeat(np.asarray(temperatures, dtype=np.float64), num_samples),
            "size": np.full(n_t * num_samples, size, dtype=np.int64),
            "seed": np.repeat(np.asarray(seeds, dtype=np.int64), num_samples),
        },
        info={"temperatures": [float(t) for t in temperatures], "seeds": seeds},
    )


# -------------------------------------------------------------------------------- digits


def digits() -> SourceData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16), [1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images)
    assert images.min() >= 0 and images.max() <= 16 and np.all(images == np.round(images))
    return SourceData(
        x=images.astype(np.uint8)[:, None],
        meta=DataMeta(
            sample_shape=(1, 8, 8),
            data_kind="levels",
            num_levels=17,
            label_kind="class",
            num_classes=10,
        ),
        cls=np.asarray(d.target, dtype=np.int64),
    )


# --------------------------------------------------------------------------- GMM


def gmm_params(dim: int, num_components: int, *, seed: int) -> dict[str, np.ndarray]:
    """Mixture weights, means [K, D] and full covariances [K, D, D] drawn from ``seed``."""
    rng = np.random.default_rng(_derived_seed(seed, 1))
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = rng.normal(0.0, 3.0, size=(num_components, dim))
    a = rng.normal(0.0, 1.0, size=(num_components, dim, dim)) / math.sqrt(dim)
    # A A^T is positive semi-definite; + 0.1 I keeps it well conditioned.
    covs = a @ np.swapaxes(a, 1, 2) * 0.5 + 0.1 * np.eye(dim)
    return {"weights": weights, "means": means, "covariances": covs}


def gmm_log_prob(x: np.ndarray, weights, means, covariances) -> np.ndarray:
    """Exact log-density of a Gaussian mixture at x [N, D]:
    log sum_k w_k N(x; mu_k, Sigma_k), through a Cholesky factor and log-sum-exp."""
    x = np.asarray(x, dtype=np.float64)
    weights, means, covariances = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
    d = x.shape[1]
    comps = []
    for w, mu, cov in zip(weights, means, covariances):
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (x - mu).T)  # [D, N]; |z|^2 = Mahalanobis distance
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        comps.append(math.log(w) - 0.5 * (d * math.log(2 * math.pi) + log_det + (z**2).sum(0)))
    c = np.stack(comps)  # [K, N]
    m = c.max(0)
    return m + np.log(np.exp(c - m).sum(0))


def gmm(dim: int, num_components: int, num_samples: int, *, seed: int) -> SourceData:
    """Samples of a D-dimensional Gaussian mixture whose density is known exactly; the
    manifest records the parameters and the exact mean log-likelihood of the stored samples."""
    if dim < 1 or num_components < 1 or num_samples < 1:
        raise ValueError(
            f"gmm: --dim, --num-components and --num-samples must be >= 1, got "
            f"{dim}, {num_components}, {num_samples}"
        )
    p = gmm_params(dim, num_components, seed=seed)
    rng = np.random.default_rng(_derived_seed(seed, 2))
    comp = rng.choice(num_components, size=num_samples, p=p["weights"])
    chols = np.linalg.cholesky(p["covariances"])
    eps = rng.normal(size=(num_samples, dim))
    x = p["means"][comp] + np.einsum("nij,nj->ni", chols[comp], eps)
    x = x.astype(np.float32)
    # Log-likelihood of the float32 values actually stored, not of the float64 draws.
    log_lik = gmm_log_prob(x, **p)
    return SourceData(
        x=x,
        meta=DataMeta(sample_shape=(dim,), data_kind="continuous"),
        json_columns={"component": comp.astype(np.int64), "log_likelihood": log_lik},
        info={
            "gmm": {k: v.tolist() for k, v in p.items()},
            "mean_log_likelihood": float(log_lik.mean()),
        },
    )


# ------------------------------------------------------------- user arrays (npy, hf)


def _infer_meta(
    sample_shape: tuple[int, ...],
    stats: ValueStats,
    labels: np.ndarray | None,
    *,
    data_kind: str | None,
    num_levels: int | None,
    label_kind: str | None,
) -> DataMeta:
    """DataMeta for user arrays: explicit options win; otherwise inferred from the values
    (only {-1, +1} -> spins; non-negative integers -> levels 0..max; else continuous)."""
    data_kind, num_levels = _infer_data_kind(stats, data_kind=data_kind, num_levels=num_levels)
    label_kind, num_classes, label_values = _infer_label_kind(labels, label_kind=label_kind)
    label_range = None
    if label_kind == "continuous" and label_values is None:
        label_range = (float(labels.min()), float(labels.max()))
    return DataMeta(
        sample_shape=tuple(int(s) for s in sample_shape),
        data_kind=data_kind,
        num_levels=num_levels,
        label_kind=label_kind,
        num_classes=num_classes,
        label_values=label_values,
        label_range=label_range,
    )


def _infer_data_kind(stats: ValueStats, *, data_kind: str | None, num_levels: int | None
                     ) -> tuple[str, int | None]:
    """(data_kind, num_levels) of values with ``stats``: the options checked, or inferred."""
    allowed = ("spins", "levels", "continuous")
    if data_kind is not None and data_kind not in allowed:
        raise ValueError(f"--data-kind must be one of {allowed}, got {data_kind!r}")
    if data_kind is None:
        if stats.is_spins:
            data_kind = "spins"
        elif stats.integer_dtype and stats.min >= 0:
            data_kind = "levels"
        else:
            data_kind = "continuous"
    if data_kind == "spins" and not stats.is_spins:
        raise ValueError("--data-kind spins needs every value in {-1, +1}")
    if data_kind == "levels":
        if not stats.is_integer or stats.min < 0:
            raise ValueError("--data-kind levels needs non-negative integer values")
        top = int(stats.max) + 1
        if num_levels is None:
            num_levels = top
        elif num_levels < top:
            raise ValueError(f"--num-levels {num_levels} is below the largest value + 1 ({top})")
    elif num_levels is not None:
        raise ValueError("--num-levels only applies to --data-kind levels")
    return data_kind, num_levels


def _infer_label_kind(labels: np.ndarray | None, *, label_kind: str | None
                      ) -> tuple[str, int | None, tuple[float, ...] | None]:
    """(label_kind, num_classes, label_values) of ``labels``: the option checked, or inferred."""
    num_classes = label_values = None
    if labels is None:
        if label_kind not in (None, "none"):
            raise ValueError(f"--label-kind {label_kind} needs labels")
        return "none", num_classes, label_values
    if label_kind is None:
        label_is_int = np.issubdtype(labels.dtype, np.integer) or np.all(labels == np.round(labels))
        label_kind = "class" if label_is_int and labels.min() >= 0 else "continuous"
    if label_kind == "class":
        if labels.min() < 0 or not np.all(labels == np.round(labels)):
            raise ValueError("--label-kind class needs non-negative integer labels")
        num_classes = int(labels.max()) + 1
    elif label_kind == "continuous":
        distinct = np.unique(labels.astype(np.float64))
        # A handful of distinct values (temperatures, couplings) is a conditioning grid.
        label_values = tuple(float(v) for v in distinct) if len(distinct) <= 256 else None
    else:
        raise ValueError(f"--label-kind must be class or continuous, got {label_kind!r}")
    return label_kind, num_classes, label_values


def _from_arrays(
    x: np.ndarray,
    labels: np.ndarray | None,
    *,
    add_channel_dim: bool,
    data_kind: str | None,
    num_levels: int | None,
    label_kind: str | None,
    what: str,
) -> SourceData:
    if x.dtype.hasobject or x.ndim < 2:
        raise ValueError(f"{what}: x must be a numeric array [N, ...] with N samples, got {x.dtype} {x.shape}")
    if add_channel_dim:
        x = x[:, None]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ValueError(f"{what}: labels must have shape [{len(x)}], got {labels.shape}")
    meta = _infer_meta(x.shape[1:], ValueStats.of(x), labels, data_kind=data_kind, num_levels=num_levels,
                       label_kind=label_kind)
    if meta.data_kind == "spins":
        x = x.astype(np.int8)
    if meta.label_kind == "class":
        return SourceData(x=x, meta=meta, cls=labels.astype(np.int64))
    if meta.label_kind == "continuous":
        return SourceData(x=x, meta=meta, json_columns={"label": labels.astype(np.float64)})
    return SourceData(x=x, meta=meta)


def _load_array(path: str, key: str | None, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no such file {path}")
    try:
        loaded = np.load(p, allow_pickle=False)  # never unpickle user files
    except ValueError as e:
        raise ValueError(f"{what}: cannot read {path} without unpickling ({e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.keys())
            if key is None:
                if len(names) != 1:
                    raise ValueError(f"{what}: {path} holds arrays {names}; choose one with --{what}-key")
                key = names[0]
            if key not in names:
                raise ValueError(f"{what}: {path} has no array {key!r}; it holds {names}")
            return loaded[key]
    if key is not None:
        raise ValueError(f"{what}: --{what}-key only applies to .npz files, {path} is a single array")
    return loaded


def npy(
    x_path: str,
    *,
    x_key: str | None = None,
    labels_path: str | None = None,
    labels_key: str | None = None,
    add_channel_dim: bool = False,
    data_kind: str | None = None,
    num_levels: int | None = None,
    label_kind: str | None = None,
) -> SourceData:
    """Arrays from a .npy or .npz file [N, ...], with optional labels [N]."""
    x = _load_array(x_path, x_key, "x")
    labels = _load_array(labels_path, labels_key, "labels") if labels_path else None
    return _from_arrays(
        x, labels, add_channel_dim=add_channel_dim, data_kind=data_kind,
        num_levels=num_levels, label_kind=label_kind, what="npy",
    )


def _looks_like_path(path: str) -> bool:
    """Whether ``path`` can only be a file system path, not a hub name (NAME or OWNER/NAME)."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
            or any(c in path for c in "*?[") or path.endswith((".parquet", ".arrow", ".json", ".csv")))


def hf(
    path: str,
    *,
    x_column: str,
    label_column: str | None = None,
    split: str = "train",
    add_channel_dim: bool = False,
    data_kind: str | None = None,
    num_levels: int | None = None,
    label_kind: str | None = None,
) -> SourceData:
    """A Hugging Face ``datasets`` dataset: a directory written by ``save_to_disk``, local
    parquet/arrow files (a path or glob), or, when a hub is reachable, a hub name."""
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif path.endswith((".parquet", ".arrow")) or (p.is_dir() and any(p.glob("*.parquet"))):
        builder = "arrow" if path.endswith(".arrow") else "parquet"
        files = str(p / "*.parquet") if p.is_dir() else path
        ds = datasets.load_dataset(builder, data_files={split: files})
    elif p.exists():
        raise ValueError(
            f"hf: {path} is neither a save_to_disk directory nor .parquet/.arrow files"
        )
    elif _looks_like_path(path):
        # A hub name is `name` or `owner/name`; asking the hub for a missing local path
        # reports a network or repository error that never names the path (issue 15 item 10).
        raise ValueError(f"hf: --path {path} does not exist (a local path: it is not looked up on the hub; "
                         f"a hub name is NAME or OWNER/NAME)")
    else:
        ds = datasets.load_dataset(path)  # a hub name; fails clearly when offline
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"hf: {path} has no split {split!r}; it has {list(ds)}")
        ds = ds[split]
    for c in (x_column, label_column):
        if c is not None and c not in ds.column_names:
            raise ValueError(f"hf: {path} has no column {c!r}; columns are {ds.column_names}")
    table = ds.with_format("numpy")
    x = np.asarray(table[x_column])
    labels = np.asarray(table[label_column]) if label_column else None
    return _from_arrays(
        x, labels, add_channel_dim=add_channel_dim, data_kind=data_kind,
        num_levels=num_levels, label_kind=label_kind, what="hf",
    )


# ---------------------------------------------------------------------------- HDF5


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
    meta = _infer_meta(sample_shape, stats, labels, data_kind=data_kind, num_levels=num_levels,
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


# ------------------------------------------------------------- calorimeter showers


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
    rng = np.random.default_rng(_derived_seed(seed, 1))
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


# ------------------------------------------------------------- Gaussian random fields


def grf(field, num_samples: int, *, seed: int) -> SourceData:
    """``num_samples`` Gaussian random fields ``field`` (a ``pipeline.physics.grf.GRF``),
    channel-first float32 [C, L] / [C, L, L] / [C, L, L, L], drawn with seed
    ``SeedSequence([seed, 1])``. The manifest's info records the field (enough to rebuild its
    exact spectrum with ``grf_from_info``); when the density is non-degenerate each sample's
    exact log-likelihood (of the stored float32 values) goes in its json and the mean NLL in
    nats per dimension in the info."""
    if num_samples < 1:
        raise ValueError(f"grf: --num-samples must be >= 1, got {num_samples}")
    derived = _derived_seed(seed, 1)
    rng = np.random.default_rng(derived)
    # Drawn in fixed chunks to bound the float64 temporaries; the chunking is fixed, so the
    # output depends only on the seed.
    chunk = 256
    x = np.concatenate([
        field.sample(min(chunk, num_samples - start), rng).astype(np.float32)
        for start in range(0, num_samples, chunk)
    ])
    info: dict[str, Any] = {"grf": field.info(), "seed": seed, "derived_seed": derived}
    json_columns: dict[str, np.ndarray] = {}
    if np.all(field.power_half() > 0):
        log_lik = np.concatenate([field.log_density(x[s:s + chunk]) for s in range(0, num_samples, chunk)])
        json_columns["log_likelihood"] = log_lik
        info["nll_nats_per_dim"] = float(-log_lik.mean() / (field.channels * field.num_sites))
    return SourceData(
        x=x,
        meta=DataMeta(sample_shape=field.shape, data_kind="continuous"),
        json_columns=json_columns,
        info=info,
    )


# ------------------------------------------------------------------------ lattice phi^4


def phi4(theory, num_samples: int, hmc, *, seed: int) -> SourceData:
    """``num_samples`` configurations of ``theory`` (a ``pipeline.physics.phi4.Phi4``)
    sampled by HMC with settings ``hmc`` from seed ``SeedSequence([seed, 1])``, stored
    float32 [1, L, L] (periodic). Each sample's json has kappa, lam, its chain and trajectory;
    the manifest's info the theory, the sampler's acceptance, the integrated autocorrelation
    time of |M| and the thinning it chose, and at lam = 0 the exact free-field values."""
    from pipeline.physics import phi4 as phi4_mod

    if num_samples < 1:
        raise ValueError(f"phi4: --num-samples must be >= 1, got {num_samples}")
    result = phi4_mod.sample(theory, num_samples, hmc, np.random.default_rng(_derived_seed(seed, 1)))
    return SourceData(
        x=result.configs.astype(np.float32)[:, None],
        meta=DataMeta(sample_shape=(1, theory.size, theory.size), data_kind="continuous", boundary="periodic"),
        json_columns={"kappa": np.full(num_samples, theory.kappa), "lam": np.full(num_samples, theory.lam),
                      "chain": result.chain.astype(np.int64), "trajectory": result.trajectory.astype(np.int64)},
        info={**phi4_mod.info(theory, hmc, result), "seed": seed},
    )
