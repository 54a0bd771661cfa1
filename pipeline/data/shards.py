"""Writing WebDataset shards and their manifest.

Layout of an output directory::

    train-000000.tar  train-000001.tar ...  validation-000000.tar ...  manifest.json

Each sample has ``__key__``, ``npy`` (the array, e.g. int8 [1, L, L] spins), ``json``
(per-sample metadata: ``index`` in the source plus source columns such as ``temperature``)
and, when the data has classes, ``cls``. Shards are written by ``webdataset.ShardWriter``
into a staging directory and renamed into place, the manifest last, so a reader that goes by
the manifest (or by shard names) never sees a half-written shard. Writing is deterministic
(fixed tar mtime/owner, seeded split), so the same command gives byte-identical shards, and
a second run with the same parameters finds the manifest and does nothing.

An object-store output (``--out s3://bucket/prefix``) is staged in a local temporary
directory and uploaded shard by shard through :mod:`pipeline.data.storage` (an object
appears whole or not at all), the old manifest deleted first and the new one put last: a
reader never sees a manifest whose shards are not all there.

Samples are assigned to shards in groups of ``samples_per_shard``; each group is written by
its own ShardWriter (splitting further if ``max_shard_bytes`` is reached), which lets
``workers`` processes write groups in parallel while the result does not depend on
``workers``.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import storage
from pipeline.data.hashing import sha256_file  # noqa: F401 - also part of this module's API
# meta_to_dict, meta_from_dict: re-exported (the manifest's 'meta' is their JSON form)
from pipeline.data.meta import DataMeta, meta_from_dict, meta_to_dict  # noqa: F401
from pipeline.errors import ConfigError
from pipeline.data.sources import SourceData

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipeline-webdataset-shards/1"
SPLITS = ("train", "validation")
_SHARD_NAME = re.compile(r"^(train|validation)-\d{6}\.tar$")


# ------------------------------------------------------------------------------ manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard directory or object-store prefix (or of a manifest.json path)."""
    path = str(path)
    if storage.is_remote(path):
        where = path if path.endswith("/" + MANIFEST_NAME) else storage.join(path, MANIFEST_NAME)
        try:
            text = storage.read_bytes(where).decode()
        except storage.NotFound as e:
            if "bucket" in str(e).lower():
                raise
            raise ConfigError(f"no {MANIFEST_NAME} at {where}") from None
    else:
        p = Path(path)
        where = str(p / MANIFEST_NAME if p.is_dir() else p)
        try:
            text = Path(where).read_text()
        except FileNotFoundError:
            raise ConfigError(f"no {MANIFEST_NAME} at {where}") from None
    try:
        m = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid JSON ({e}); rewrite the shards with `pipeline shards ...`") from None
    _check_manifest(m, where)
    return m


# What readers take from a manifest; each shard entry as write_shards records it.
_MANIFEST_FIELDS = ("format", "meta", "shards")
_SHARD_FIELDS = ("name", "split", "num_samples", "num_bytes", "sha256")


def _check_manifest(m: Any, p: str) -> None:
    """ConfigError naming what is missing or wrong in manifest ``m`` (read from ``p``), so a
    damaged or hand-written manifest fails here with its path, not as a KeyError later."""
    redo = "; rewrite the shards with `pipeline shards ...` (or remove the manifest to read the tars alone)"
    if not isinstance(m, dict):
        raise ConfigError(f"{p} must hold a JSON object, got {type(m).__name__}{redo}")
    if m.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{p}: unknown manifest format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}{redo}")
    missing = [k for k in _MANIFEST_FIELDS if k not in m]
    if missing:
        raise ConfigError(f"{p} lacks the field(s) {', '.join(missing)}{redo}")
    try:
        meta_from_dict(m["meta"])
    except (TypeError, KeyError, ValueError) as e:
        names = ", ".join(f.name for f in fields(DataMeta))
        raise ConfigError(f"{p}: 'meta' is not a valid data description ({e}); it holds {names}{redo}") from None
    if not isinstance(m["shards"], list) or not all(isinstance(s, dict) for s in m["shards"]):
        raise ConfigError(f"{p}: 'shards' must be a list of objects{redo}")
    for i, s in enumerate(m["shards"]):
        lacking = [k for k in _SHARD_FIELDS if k not in s]
        if lacking:
            raise ConfigError(f"{p}: shards[{i}] lacks {', '.join(lacking)}{redo}")


def shard_url(directory: str | os.PathLike, name: str) -> str:
    """Where shard ``name`` of a shard directory or object-store prefix is."""
    return storage.join(str(directory), name) if storage.is_remote(str(directory)) else str(Path(directory) / name)


def verify(directory: str | os.PathLike, *, checksum: bool = False, split: str | None = None,
           schema_members: int = 0) -> list[str]:
    """Problems with the shards a manifest lists: missing files, wrong sizes, with
    ``checksum`` wrong sha256, and with ``schema_members`` > 0 samples (that many per shard)
    whose shape, dtype or keys differ from the manifest's schema. An empty list means the
    shards are as written."""
    from pipeline.data import schema  # schema -> tario; kept out of the writer's import path

    manifest = read_manifest(directory)
    listed = [s for s in manifest["shards"] if split is None or s["split"] == split]
    urls = [shard_url(directory, s["name"]) for s in listed]
    found = storage.sizes(urls)  # one listing per prefix in an object store
    problems = []
    for s, p in zip(listed, urls):
        size = found[p]
        if size is None:
            problems.append(f"shard {p} is missing")
            continue
        if size != s["num_bytes"]:
            problems.append(f"shard {p} has {size} bytes, the manifest says {s['num_bytes']}")
        elif checksum and _sha256(p) != s["sha256"]:
            problems.append(f"shard {p} has a different sha256 than the manifest records (modified)")
        if schema_members > 0:
            problems += schema.check_shard(p, manifest["schema"], num_members=schema_members)
    return problems


def _sha256(url: str) -> str:
    if storage.is_remote(url):
        import hashlib

        return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return sha256_file(url)


# -------------------------------------------------------------------------------- writing


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _sample(data: SourceData, i: int, x: np.ndarray, key_width: int, first_index: int = 0) -> dict[str, Any]:
    """Sample ``i`` of ``data`` whose array ``x`` (= ``data.x[i]``) the caller has read; its key
    and json ``index`` are ``first_index + i`` (its index in the whole set, when ``data`` holds
    a part of it)."""
    meta = {"index": first_index + i}
    for k, col in data.json_columns.items():
        meta[k] = col[i].item()
    s = {
        "__key__": f"{first_index + i:0{key_width}d}",
        "npy": _npy_bytes(x),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if data.cls is not None:
        s["cls"] = str(int(data.cls[i])).encode()
    return s


# Set before forking the writer processes; children read the arrays copy-on-write.
_WRITE_STATE: dict[str, Any] = {}


def _write_group(task: tuple[str, int, np.ndarray]) -> list[dict[str, Any]]:
    """Write one group of samples with a ShardWriter; return its shards in order."""
    import webdataset as wds

    split, group, indices = task
    st = _WRITE_STATE
    shards: list[dict[str, Any]] = []

    def done(fname: str) -> None:
        shards.append({"path": fname, "num_samples": writer.count})

    pattern = os.path.join(st["staging"], f"{split}-{group:06d}-%04d.tar")
    # Fixed mtime/owner: identical parameters give byte-identical shards (and sha256).
    writer = wds.ShardWriter(
        pattern, maxcount=st["samples_per_shard"], maxsize=st["max_shard_bytes"], post=done,
        verbose=0, mtime=0, user="pipeline", group="pipeline",
    )
    # One read of the group's rows: for an on-demand x (HDF5) that bounds what is held to
    # one group, and it is one gather, not one per sample.
    rows = st["data"].x[indices]
    with writer:
        for i, x in zip(indices, rows):
            writer.write(_sample(st["data"], int(i), x, st["key_width"]))
    for s in shards:
        s["num_bytes"] = os.path.getsize(s["path"])
        s["sha256"] = sha256_file(s["path"])
    return shards


def write_one_shard(path: str | os.PathLike, data: SourceData, *, first_index: int, key_width: int) -> dict[str, Any]:
    """Write every sample of ``data`` as one tar at ``path`` (keys ``first_index`` + i), staged
    beside it and renamed into place, so ``path`` exists only complete; returns its manifest
    entry (without ``split``). For writers that produce a shard set piece by piece (sampling
    across ranks), with the same members and tar settings as :func:`write_shards`."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")
    with wds.TarWriter(str(tmp), mtime=0, user="pipeline", group="pipeline") as writer:
        for i in range(len(data.x)):
            writer.write(_sample(data, i, data.x[i], key_width, first_index))
    entry = {"name": path.name, "num_samples": len(data.x), "num_bytes": os.path.getsize(tmp),
             "sha256": sha256_file(tmp)}
    os.replace(tmp, path)  # atomic: a reader (or a resumed writer) sees all of it or nothing
    return entry


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """``manifest.json`` in ``out_dir`` (a directory or an object-store prefix), replaced atomically
    (rename; one PUT), written last: a reader never sees a manifest whose shards are not all in place."""
    if storage.is_remote(str(out_dir)):
        storage.write_bytes(shard_url(out_dir, MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode())
        return
    out = Path(out_dir)
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)


def split_indices(num_samples: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded permutation of 0..N-1 cut into validation (first) and train. Shards hold samples
    in this shuffled order, so a shard mixes e.g. all temperatures."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(num_samples * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= num_samples:
        raise ValueError(
            f"--val-fraction {val_fraction} leaves no training sample out of {num_samples}"
        )
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11])).permutation(num_samples)
    return {"validation": perm[:n_val], "train": perm[n_val:]}


def params_match(out_dir: str | os.PathLike, params: dict[str, Any]) -> bool:
    """Whether ``out_dir`` already holds a complete shard set written with ``params``."""
    if not storage.exists(shard_url(out_dir, MANIFEST_NAME)):
        return False
    try:
        m = read_manifest(out_dir)
    except ValueError:
        return False
    return m.get("params") == json.loads(json.dumps(params)) and not verify(out_dir)


def existing_params(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return read_manifest(out_dir).get("params")
    except ValueError:
        return None


def write_shards(
    data: SourceData,
    out_dir: str | os.PathLike,
    *,
    source: str,
    params: dict[str, Any],
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Write ``data`` as train/validation shards plus ``manifest.json``; return the manifest.

    ``params`` are the creation parameters recorded in the manifest (what makes two runs the
    same); ``workers`` parallel processes write shard groups and do not change the output.
    """
    _check_write_options(samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes, workers=workers)
    n = len(data.x)
    splits = split_indices(n, val_fraction, seed)
    remote = storage.is_remote(str(out_dir))
    staging = _staging_dir(out_dir, remote)  # local disk: remote sets are uploaded shard by shard
    try:
        _WRITE_STATE.update(
            data=data, staging=staging, samples_per_shard=samples_per_shard,
            max_shard_bytes=max_shard_bytes, key_width=max(8, len(str(n - 1))),
        )
        tasks = _group_tasks(splits, samples_per_shard)
        written = _write_groups(tasks, workers)
        shards, counters = (_upload_into_place if remote else _move_into_place)(str(out_dir), tasks, written)
    finally:
        _WRITE_STATE.clear()
        shutil.rmtree(staging, ignore_errors=True)

    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "params": params,
        "meta": meta_to_dict(data.meta),
        "schema": sample_schema(data),
        "total_samples": n,
        "splits": {
            s: {"num_samples": int(len(splits[s])), "num_shards": counters[s]} for s in SPLITS
        },
        "shards": shards,
        "info": data.info,
    }
    assert sum(s["num_samples"] for s in shards) == n
    write_manifest(out_dir, manifest)
    return manifest


def _check_write_options(**counts: int) -> None:
    for name, value in counts.items():  # each named as its command-line option
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _staging_dir(out_dir: str | os.PathLike, remote: bool) -> str:
    """A fresh directory where the shards are written before they move into place: beside them
    (``.staging-*`` in ``out_dir``, so the move is a rename; those an interrupted run left are
    removed), or a temporary directory for an object store."""
    if remote:
        return tempfile.mkdtemp(prefix="pipeline-shards-")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".staging-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=".staging-", dir=out)


def _group_tasks(splits: dict[str, np.ndarray], samples_per_shard: int) -> list[tuple[str, int, np.ndarray]]:
    """(split, group, source indices) of every group of ``samples_per_shard`` samples, train first."""
    tasks = []
    for split in SPLITS:
        idx = splits[split]
        for g, start in enumerate(range(0, len(idx), samples_per_shard)):
            tasks.append((split, g, idx[start:start + samples_per_shard]))
    return tasks


def _write_groups(tasks: list[tuple[str, int, np.ndarray]], workers: int) -> list[list[dict[str, Any]]]:
    """Each task's staged shards (as :func:`_write_group` returns them), in task order."""
    if workers > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")  # children inherit _WRITE_STATE
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            return list(pool.map(_write_group, tasks))
    return [_write_group(t) for t in tasks]


def _final_names(tasks: list[tuple[str, int, np.ndarray]], written: list[list[dict[str, Any]]]
                 ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, int]]:
    """(staged path, manifest entry named ``{split}-NNNNNN.tar``) of every staged shard in
    order, and shards per split."""
    named = []
    counters = {s: 0 for s in SPLITS}
    for (split, _, _), group_shards in zip(tasks, written):
        for s in group_shards:
            name = f"{split}-{counters[split]:06d}.tar"
            counters[split] += 1
            named.append((s["path"], {"name": name, "split": split, "num_samples": s["num_samples"],
                                      "num_bytes": s["num_bytes"], "sha256": s["sha256"]}))
    return named, counters


def _move_into_place(out_dir: str, tasks: list[tuple[str, int, np.ndarray]], written: list[list[dict[str, Any]]]
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rename the staged shards to ``{split}-NNNNNN.tar`` in ``out_dir`` (the old manifest
    gone first, stale shards after); return the manifest's shard entries and shards per split."""
    # Old shards of this naming scheme that the new set will not overwrite must go,
    # or a glob over the directory would mix two data sets.
    out = Path(out_dir)
    old_manifest = out / MANIFEST_NAME
    if old_manifest.exists():
        old_manifest.unlink()
    named, counters = _final_names(tasks, written)
    for path, entry in named:
        os.replace(path, out / entry["name"])  # atomic: a reader sees all of it or nothing
    names = {e["name"] for _, e in named}
    for f in out.iterdir():
        if _SHARD_NAME.match(f.name) and f.name not in names:
            f.unlink()
    return [e for _, e in named], counters


def _upload_into_place(out_url: str, tasks: list[tuple[str, int, np.ndarray]], written: list[list[dict[str, Any]]]
                       ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """:func:`_move_into_place` for an object-store prefix: each shard one upload (an
    object appears whole or not at all), the old manifest deleted first, stale shards after."""
    storage.delete(storage.join(out_url, MANIFEST_NAME))
    named, counters = _final_names(tasks, written)
    for path, entry in named:
        storage.upload(path, storage.join(out_url, entry["name"]))
    names = {e["name"] for _, e in named}
    for name in storage.list_sizes(out_url):
        if _SHARD_NAME.match(name) and name not in names:
            storage.delete(storage.join(out_url, name))
    return [e for _, e in named], counters


def sample_schema(data: SourceData) -> dict[str, Any]:
    """The manifest's ``schema``: the members of every sample, from the first sample."""
    sample0 = data.x[0]
    schema: dict[str, Any] = {
        "__key__": "str: source index, zero-padded",
        "npy": {"dtype": str(sample0.dtype), "shape": list(sample0.shape)},
        "json": {"keys": sorted(["index", *data.json_columns])},
    }
    if data.cls is not None:
        schema["cls"] = "int: class index"
    return schema
