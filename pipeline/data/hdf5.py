"""Reading one numeric HDF5 dataset (or Zarr array) row by row, in bounded memory (h5py,
zarr); writing the CaloChallenge layout.

Physics data is mostly HDF5: the CaloChallenge layout is ``showers`` [N, voxels] float32
with ``incident_energies`` [N, 1] float32 (MeV). Such files can be larger than RAM, so the
samples are never loaded whole: :class:`H5Rows` looks like the ``x`` array of a
:class:`~pipeline.data.sources.SourceData` (``len``, ``shape``, ``dtype``, ``x[i]``,
``x[indices]``) but asks h5py only for the rows an index names, at most ``block_rows`` at a
time and from at most ``block_rows`` rows' worth of storage chunks; the shard writer fetches
one shard group's rows per call, so what is held at once is one group
(``--samples-per-shard`` samples) plus one read block (at least one chunk: a dataset stored
in chunks much larger than 64 MiB is read a chunk at a time).

One pass over the file in blocks (:func:`value_stats`) gives what the source needs to know
about the values (finite? integers? only -1/+1? min/max) without holding them.

Cost: a group's rows are spread over the file by the writer's seeded split permutation,
so each group reads the HDF5 chunks its rows lie in; on a chunked, compressed dataset of many
chunks that is up to one chunk decompression per row. Fine for CaloChallenge-sized files
(10^5 showers); for much larger ones, store the dataset contiguously (h5py's default) or
with small chunks.

:func:`write_calochallenge` writes ``showers`` [N, voxels] float32 and
``incident_energies`` [N, 1] float32 chunk by chunk (``pipeline shards calo``), into a
temporary file renamed into place, so a reader never sees half a file.

A Zarr store (a directory ``*.zarr``, zarr-python 3) is read the same way: the same
keys, checks and bounded reads (rows by index through ``.oindex``).

The file is opened lazily in each process (the writer forks its workers; an h5py handle must
not cross a fork), and is closed by :meth:`H5Rows.close`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BLOCK_BYTES = 64 * 2**20  # one read: a bounded slab, whatever the row size


def is_zarr(path: str) -> bool:
    """A Zarr store is a directory named ``*.zarr``; anything else is read as HDF5."""
    return str(path).rstrip("/").endswith(".zarr")


class _Store:
    """An open HDF5 file or Zarr group: ``[key]``, ``close()`` and the paths of its arrays."""

    def __init__(self, path: str):
        self.zarr = is_zarr(path)
        if self.zarr:
            import zarr

            try:
                self.root = zarr.open_group(path, mode="r")
            except Exception as e:  # zarr raises several types for "not a store"
                raise ValueError(f"hdf5: cannot open {path} as a Zarr store ({e})") from None
        else:
            import h5py

            try:
                self.root = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"hdf5: cannot open {path} as HDF5 ({e})") from None

    def array(self, key: str):
        """The array at ``key``, or None when there is none (missing, or a group)."""
        if self.zarr:
            import zarr

            node = self.root[key] if key in self.root else None
            return node if isinstance(node, zarr.Array) else None
        import h5py

        node = self.root[key] if key in self.root else None
        return node if isinstance(node, h5py.Dataset) else None

    def array_names(self) -> list[str]:
        if self.zarr:
            import zarr

            return sorted(k for k, v in self.root.members(max_depth=None) if isinstance(v, zarr.Array))
        import h5py

        names: list[str] = []
        self.root.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def close(self) -> None:
        if not self.zarr:  # a Zarr group holds no open handle
            self.root.close()


def open_dataset(path: str, key: str, what: str):
    """(store, array) for ``key`` in the HDF5 file or Zarr store at ``path``; ValueError
    naming the arrays that exist when it is missing or not an array."""
    if not (Path(path).is_dir() if is_zarr(path) else Path(path).is_file()):
        raise ValueError(f"hdf5: no such {'Zarr store' if is_zarr(path) else 'file'} {path}")
    store = _Store(path)
    ds = store.array(key)
    if ds is None:
        names = store.array_names()
        store.close()
        raise ValueError(f"hdf5: {path} has no dataset {key!r} (--{what}); its datasets are {names or 'none'}")
    return store, ds


def check_numeric(ds, path: str, key: str) -> None:
    if ds.dtype.kind not in "biuf" or ds.dtype.fields is not None:
        raise ValueError(f"hdf5: dataset {key!r} in {path} has dtype {ds.dtype}, not a numeric "
                         f"(bool, integer or float) array")
    if ds.ndim < 1 or ds.shape[0] < 1:
        raise ValueError(f"hdf5: dataset {key!r} in {path} has shape {ds.shape}; need [N, ...] with N >= 1")


class H5Rows:
    """Rows of ``key`` in ``path`` as samples of ``sample_shape`` (a reshape of each row; the
    element counts must agree), read on demand. ``reads`` records the row count of every
    h5py read (what the bounded-memory test checks)."""

    def __init__(self, path: str, key: str, *, sample_shape: tuple[int, ...] | None = None,
                 dtype: np.dtype | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES):
        f, ds = open_dataset(path, key, "x-key")
        try:
            check_numeric(ds, path, key)
            self.num_rows, row_shape, self.source_dtype = int(ds.shape[0]), tuple(ds.shape[1:]), ds.dtype
            # Rows per storage chunk (1: contiguous, no chunks to decompress).
            self.chunk_rows = int(ds.chunks[0]) if ds.chunks else 1
        finally:
            f.close()
        row_size = int(np.prod(row_shape, dtype=np.int64))
        if sample_shape is not None and int(np.prod(sample_shape, dtype=np.int64)) != row_size:
            raise ValueError(f"hdf5: --x-shape {','.join(map(str, sample_shape))} has "
                             f"{int(np.prod(sample_shape))} elements, but each row of {key!r} has shape "
                             f"{list(row_shape)} = {row_size} elements")
        self.path, self.key, self.is_zarr = path, key, is_zarr(path)
        self.row_shape = row_shape
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else row_shape
        self.dtype = np.dtype(dtype) if dtype is not None else self.source_dtype
        row_bytes = max(1, row_size * self.source_dtype.itemsize)
        self.block_rows = max(1, block_bytes // row_bytes)
        self.reads: list[int] = []
        self._handle: tuple[int, object, object] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_rows, *self.sample_shape)

    def __len__(self) -> int:
        return self.num_rows

    def _ds(self):
        # Reopened after a fork: h5py handles are per process.
        if self._handle is None or self._handle[0] != os.getpid():
            store = _Store(self.path)
            self._handle = (os.getpid(), store, store.array(self.key))
        return self._handle[2]

    def close(self) -> None:
        if self._handle is not None and self._handle[0] == os.getpid():
            self._handle[1].close()
        self._handle = None

    def _read(self, sel) -> np.ndarray:
        ds = self._ds()
        # Rows by index: h5py takes an increasing index array directly, Zarr through .oindex.
        a = ds.oindex[sel] if self.is_zarr and not isinstance(sel, slice) else ds[sel]
        self.reads.append(len(a))
        return np.asarray(a)

    def _shape(self, rows: np.ndarray) -> np.ndarray:
        return rows.reshape(len(rows), *self.sample_shape).astype(self.dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -self.num_rows <= i < self.num_rows:
                raise IndexError(f"row {i} of {self.num_rows}")
            return self._shape(self._read(slice(i % self.num_rows, i % self.num_rows + 1)))[0]
        if isinstance(index, slice):
            return self[np.arange(self.num_rows)[index]]
        return self._take(np.asarray(index, dtype=np.int64))

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` in that order: read in increasing order (h5py's point selections
        must be), then put back in the order asked."""
        assert idx.ndim == 1 and (len(idx) == 0 or (idx.min() >= 0 and idx.max() < self.num_rows)), idx
        uniq, inverse = np.unique(idx, return_inverse=True)
        parts = []
        for block in self._read_blocks(uniq):
            contiguous = block[-1] - block[0] + 1 == len(block)
            parts.append(self._read(slice(int(block[0]), int(block[-1]) + 1) if contiguous else block))
        rows = np.concatenate(parts) if parts else np.zeros((0, *self.row_shape), self.source_dtype)
        return self._shape(rows)[inverse]

    def _read_blocks(self, uniq: np.ndarray):
        """``uniq`` (increasing) cut into reads of at most ``block_rows`` rows that touch at
        most ``block_rows // chunk_rows`` storage chunks: a read decompresses whole chunks
        (Zarr even all of them at once), so scattered rows must not pull in one chunk each."""
        max_chunks = max(1, self.block_rows // self.chunk_rows)
        chunk = uniq // self.chunk_rows
        start = 0
        while start < len(uniq):
            end = min(start + self.block_rows, len(uniq))
            new_chunk = np.flatnonzero(np.diff(chunk[start:end])) + 1  # where another chunk starts
            if len(new_chunk) >= max_chunks:
                end = start + int(new_chunk[max_chunks - 1])
            yield uniq[start:end]
            start = end

    def blocks(self):
        """(start, rows) over the whole dataset in order, ``block_rows`` at a time."""
        for start in range(0, self.num_rows, self.block_rows):
            yield start, self._read(slice(start, min(start + self.block_rows, self.num_rows)))


@dataclass(frozen=True)
class ValueStats:
    """What a source needs to know about the values without holding them."""

    is_spins: bool  # every value -1 or +1
    is_integer: bool  # every value a whole number
    integer_dtype: bool  # stored as integers (or bools): only then are levels inferred
    min: float
    max: float

    @classmethod
    def of(cls, x: np.ndarray) -> "ValueStats":
        """The stats of an array held in memory."""
        whole = x.dtype.kind in "biu" or bool(np.all(x == np.round(x)))
        return cls(is_spins=bool(np.isin(x, (-1, 1)).all()), is_integer=whole,
                   integer_dtype=x.dtype.kind in "biu", min=float(x.min()), max=float(x.max()))


def value_stats(rows: H5Rows) -> ValueStats:
    """One pass over ``rows`` in blocks; ValueError naming the first row with a NaN or Inf
    (a non-finite sample would only surface as a NaN loss mid-training)."""
    spins = integer = True
    lo, hi = np.inf, -np.inf
    for start, a in rows.blocks():
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(1)
            if bad.any():
                raise ValueError(f"hdf5: dataset {rows.key!r} in {rows.path} has a NaN or Inf in row "
                                 f"{start + int(np.argmax(bad))}")
            integer = integer and bool(np.all(a == np.round(a)))
        spins = spins and bool(np.isin(a, (-1, 1)).all())
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return ValueStats(is_spins=spins, is_integer=integer, integer_dtype=rows.source_dtype.kind in "biu",
                      min=lo, max=hi)


def read_attrs(path: str) -> dict:
    """The root attributes of the file (store) as JSON values: Zarr's are JSON already; of an
    HDF5 file's, those holding JSON text (such as the ``calo`` record ``pipeline shards calo``
    writes), decoded; other attributes are skipped."""
    import json

    store = _Store(path)
    try:
        if store.zarr:
            return dict(store.root.attrs)
        out = {}
        for k, v in store.root.attrs.items():
            v = v.decode() if isinstance(v, bytes) else v
            if isinstance(v, str):
                try:
                    out[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
        return out
    finally:
        store.close()


def read_labels(path: str, key: str, num_rows: int) -> np.ndarray:
    """The label dataset [N] or [N, 1] as a vector [N]; ValueError when it has another
    length or more than one value per row."""
    f, ds = open_dataset(path, key, "label-key")
    try:
        check_numeric(ds, path, key)
        if ds.shape[0] != num_rows:
            raise ValueError(f"hdf5: label dataset {key!r} has {ds.shape[0]} rows, the samples have {num_rows}")
        if int(np.prod(ds.shape[1:], dtype=np.int64)) != 1:
            raise ValueError(f"hdf5: label dataset {key!r} has shape {list(ds.shape)}; a label is one value "
                             f"per sample ([N] or [N, 1])")
        labels = np.asarray(ds[...]).reshape(num_rows)  # one value per sample: N numbers, small next to x
    finally:
        f.close()
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(f"hdf5: label dataset {key!r} has a NaN or Inf at row {int(np.argmax(~np.isfinite(labels)))}")
    return labels


def write_calochallenge(path: str, chunks, *, num_samples: int, num_voxels: int, attrs: dict) -> None:
    """Write ``chunks`` (an iterable of (showers [n, num_voxels], energies [n]) in MeV,
    ``num_samples`` rows in all) as the CaloChallenge layout at ``path``; ``attrs`` (JSON
    values) become the file's attributes."""
    import json

    import h5py

    tmp = Path(path).with_name(f".{Path(path).name}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            showers = f.create_dataset("showers", (num_samples, num_voxels), dtype=np.float32,
                                       chunks=(min(num_samples, 256), num_voxels))
            energies = f.create_dataset("incident_energies", (num_samples, 1), dtype=np.float32)
            start = 0
            for x, e in chunks:
                showers[start:start + len(x)] = x.astype(np.float32)
                energies[start:start + len(x), 0] = np.asarray(e, dtype=np.float32)
                start += len(x)
            assert start == num_samples, (start, num_samples)
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
