"""The user's own arrays (.npy/.npz files, Hugging Face datasets), and the DataMeta inferred
from their values where the options do not say it (also used by the HDF5 source)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.hdf5 import ValueStats
from pipeline.data.meta import DataMeta
from pipeline.data.sources.base import SourceData


def infer_meta(
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
    meta = infer_meta(x.shape[1:], ValueStats.of(x), labels, data_kind=data_kind, num_levels=num_levels,
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
