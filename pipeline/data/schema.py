"""Samples against the schema a shard manifest records (``manifest["schema"]``).

The manifest says what every sample holds: ``npy`` with a dtype and shape, ``json`` with a
set of keys, optionally ``cls``. Checked here, so that a mismatch is named (which shard,
which key, expected vs found) instead of surfacing as "corrupt samples" mid-training:

- :func:`check_label_key`: ``data.label_key`` exists in the schema (before training).
- :func:`check_shard`: a sample of a shard's members matches the schema (``pipeline shards
  verify``'s default mode).
- :func:`npy_mismatch`: why one ``.npy`` member does not decode to the expected shape (the
  stream's report of skipped samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import tario
from pipeline.errors import ConfigError


def label_keys(schema: dict[str, Any]) -> list[str]:
    """The values ``data.label_key`` may take on data with this schema."""
    keys = list(schema.get("json", {}).get("keys", []))
    return (["cls"] if "cls" in schema else []) + keys


def check_label_key(label_key: str | None, schema: dict[str, Any] | None, where: str) -> None:
    """ConfigError naming the keys that exist when ``label_key`` is not one of them."""
    if label_key is None or schema is None:
        return
    allowed = label_keys(schema)
    if label_key not in allowed:
        raise ConfigError(
            f"data.label_key={label_key!r} is not a field of the samples in {where}: its manifest's "
            f"schema has {', '.join(map(repr, allowed)) or 'no label fields'} (or null for no label)"
        )


def npy_mismatch(buf: bytes, offset: int, size: int, shape: tuple[int, ...], dtype: str | None = None) -> str | None:
    """None if the ``.npy`` member at ``offset`` holds an array of ``shape`` (and ``dtype``,
    when given); otherwise what it holds instead."""
    try:
        found_dtype, found_shape, _, header = tario._npy_header(buf, offset, size)
    except ValueError as e:
        return f"not a readable .npy ({e})"
    if tuple(found_shape) != tuple(shape):
        return f"shape {tuple(found_shape)}, the manifest says {tuple(shape)}"
    if dtype is not None and str(found_dtype) != dtype:
        return f"dtype {found_dtype}, the manifest says {dtype}"
    nbytes = int(np.prod(found_shape, dtype=np.int64)) * found_dtype.itemsize
    if size != header + nbytes:
        return f"{size - header} data bytes, {nbytes} expected for shape {tuple(found_shape)}"
    return None


def check_shard(path: Path, schema: dict[str, Any], *, num_members: int) -> list[str]:
    """Problems of up to ``num_members`` samples of the shard at ``path`` (evenly spaced,
    first and last included) against ``schema``; one line per problem, naming shard and key."""
    buf = tario.read_url(str(path))
    idx = tario.scan_tar(buf)
    problems = [f"shard {path}: {idx.problem}"] if idx.problem else []
    if len(idx) == 0:
        return problems + [f"shard {path}: no samples"]
    npy = schema.get("npy")
    json_keys = set(schema.get("json", {}).get("keys", []))
    for i in sorted({int(round(j)) for j in np.linspace(0, len(idx) - 1, min(num_members, len(idx)))}):
        where = f"shard {path} sample {idx.keys[i]!r}"
        if npy is not None:
            o, s = int(idx.offset["npy"][i]), int(idx.size["npy"][i])
            why = "no .npy member" if o < 0 else npy_mismatch(buf, o, s, tuple(npy["shape"]), npy["dtype"])
            if why:
                problems.append(f"{where} key npy: {why}")
        if json_keys:
            o, s = int(idx.offset["json"][i]), int(idx.size["json"][i])
            try:
                found = set(tario.decode_json(buf[o:o + s])) if o >= 0 else None
            except ValueError as e:
                found, problems = None, problems + [f"{where} key json: not valid JSON ({e})"]
            if found is not None and found != json_keys:
                problems.append(f"{where} key json: keys {sorted(found)}, the manifest says {sorted(json_keys)}")
            elif o < 0:
                problems.append(f"{where}: no .json member, the manifest lists keys {sorted(json_keys)}")
        if "cls" in schema and idx.offset["cls"][i] < 0:
            problems.append(f"{where}: no .cls member, the manifest lists one")
    return problems
