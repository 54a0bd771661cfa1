"""Which shards a ``data.train_urls`` / ``data.val_urls`` string names, how many samples
each holds, and what the data is (:class:`DataMeta`).

``urls`` is a directory holding manifest.json, a manifest.json path, a tar path, brace
notation, or a ``pipe:`` command; or an object-store prefix holding manifest.json
(``s3://bucket/prefix/``), a manifest.json URL, or shard URLs in brace notation, read
through :mod:`pipeline.data.storage` (a store that cannot be reached is a ConfigError here,
before training starts). Counts and meta come from a manifest when there is one
(next to the shards is enough); otherwise shards are scanned once and meta is inferred from
the first decodable samples, with a warning.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import storage, tario
from pipeline.data.meta import DataMeta
from pipeline.data.shards import MANIFEST_NAME, meta_from_dict, read_manifest, shard_url, verify
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.data")


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: list[int]  # per shard
    meta: DataMeta | None  # from a manifest, when there is one
    manifest_dir: Path | str | None  # str: an object-store prefix
    schema: dict[str, Any] | None = None  # the manifest's sample schema, when there is one


def _find_manifest(urls: str) -> Path | str | None:
    if storage.is_remote(urls):
        return _remote_manifest(urls)
    p = Path(urls)
    if p.name == MANIFEST_NAME and p.is_file():
        return p.parent
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return p
    return None


def _remote_manifest(urls: str) -> str | None:
    """The object-store prefix whose manifest ``urls`` names (``s3://b/p/``, ``s3://b/p``,
    ``s3://b/p/manifest.json``), or None for shard URLs (a ``.tar`` or brace notation).
    ConfigError when the store cannot be read or the manifest is not there."""
    storage.check_url(urls)
    if "{" in urls or urls.endswith(".tar"):
        return None
    prefix = urls.removesuffix(MANIFEST_NAME).rstrip("/")
    storage.require(storage.join(prefix, MANIFEST_NAME), f"{urls} names no shards (no .tar, no braces) and its")
    return prefix


def _expand(urls: str) -> list[str]:
    import braceexpand

    # As in webdataset, braces expand in pipe: commands too: one command per shard.
    return list(braceexpand.braceexpand(urls))


def resolve_shards(urls: str, *, split: str = "train", verify_mode: str = "size") -> ShardSet:
    """The shards behind ``urls`` and their sample counts.

    ``urls``: a directory holding manifest.json (its ``split`` shards), a manifest.json path,
    a tar path, brace notation, or a ``pipe:`` command. Shards listed in a manifest next to
    them get their counts from it; other shards are scanned once here to count samples.
    """

    if not urls:
        raise ConfigError("data.train_urls is empty; give a shard directory, tar path(s) or a pipe: command")
    mdir = _find_manifest(urls)
    if mdir is not None:
        return _manifest_shards(mdir, split=split, verify_mode=verify_mode)
    expanded, local = _expand_remote(urls) if storage.is_remote(urls) else _expand_existing(urls)
    counts, meta, manifest_dir = _neighbour_manifest(local, expanded)
    num = []
    for u in expanded:
        if u not in counts:
            counts[u] = len(tario.scan_tar(tario.read_url(u)))
        num.append(counts[u])
    if sum(num) == 0:
        raise ValueError(f"no samples in any of the shards {short_list(expanded)}")
    return ShardSet(urls=expanded, num_samples=num, meta=meta, manifest_dir=manifest_dir)


def _manifest_shards(mdir: Path | str, *, split: str, verify_mode: str) -> ShardSet:
    """The ``split`` shards a manifest directory (or object-store prefix) lists, checked as
    ``verify_mode`` says."""
    m = read_manifest(mdir)
    manifest_url = shard_url(mdir, MANIFEST_NAME)
    shards = [s for s in m["shards"] if s["split"] == split]
    if not shards:
        have = sorted({s["split"] for s in m["shards"]})
        raise ValueError(f"{manifest_url} lists no {split!r} shards (it has {have})")
    urls = [shard_url(mdir, s["name"]) for s in shards]
    found = storage.sizes(urls)
    for u in urls:
        if found[u] is None:
            raise ConfigError(f"shard {u} listed in {manifest_url} is missing")
    if verify_mode != "off":
        for problem in verify(mdir, checksum=verify_mode == "sha256", split=split):
            # The stream still runs: damaged samples are skipped and counted.
            # stacklevel 3: the warning names resolve_shards' caller.
            warnings.warn(f"{problem}; its damaged samples will be skipped", stacklevel=3)
            log.warning("%s; its damaged samples will be skipped", problem)
    return ShardSet(
        urls=urls,
        num_samples=[int(s["num_samples"]) for s in shards],
        meta=meta_from_dict(m["meta"]),
        manifest_dir=mdir,
        schema=m.get("schema"),
    )


def _expand_existing(urls: str) -> tuple[list[str], list[str]]:
    """``urls`` expanded, and those of them that are local files; ConfigError naming the
    first local shard that does not exist."""
    if Path(urls).is_dir():
        raise ConfigError(
            f"{urls} is a directory without {MANIFEST_NAME}; give shard paths instead "
            f"(e.g. {urls}/shard-{{000000..000009}}.tar)"
        )
    expanded = _expand(urls)
    local = [u for u in expanded if not u.startswith("pipe:")]
    if expanded == [urls] and local and not Path(urls.removeprefix("file:")).exists():
        raise ConfigError(
            f"data set {urls} does not exist: expected a directory holding {MANIFEST_NAME} "
            "(written by `pipeline shards`), a .tar shard, brace notation or a pipe: command"
        )
    for u in local:
        if not Path(u.removeprefix("file:")).is_file():
            raise ConfigError(f"shard {u} does not exist")
    return expanded, local


def _expand_remote(urls: str) -> tuple[list[str], list[str]]:
    """``urls`` (object-store shard URLs) expanded, and those of them next to a manifest
    (all or none); ConfigError for an unreadable store or the first missing shard."""
    expanded = _expand(urls)
    storage.require(expanded[0], "shard")
    found = storage.sizes(expanded)
    for u in expanded:
        if found[u] is None:
            raise ConfigError(f"shard {u} does not exist")
    return expanded, expanded


def _neighbour_manifest(local: list[str], expanded: list[str]
                        ) -> tuple[dict[str, int], DataMeta | None, Path | str | None]:
    """(counts per url, meta, manifest dir) from a manifest next to the shards, when it lists
    all of them; else ({}, None, None)."""
    # A manifest next to the shards supplies counts and meta when it lists all of them.
    meta = manifest_dir = None
    counts: dict[str, int] = {}
    if local and len(local) == len(expanded):
        remote = storage.is_remote(local[0])
        parent = storage.parent(local[0]) if remote else Path(local[0].removeprefix("file:")).parent
        if storage.exists(shard_url(parent, MANIFEST_NAME)):
            try:
                m = read_manifest(parent)
                listed = {shard_url(parent, s["name"]): int(s["num_samples"]) for s in m["shards"]}
                names = [shard_url(parent, u.rsplit("/", 1)[-1] if remote else Path(u.removeprefix("file:")).name)
                         for u in local]
                if all(n in listed for n in names):
                    counts = {u: listed[n] for u, n in zip(local, names)}
                    meta, manifest_dir = meta_from_dict(m["meta"]), parent
            except ValueError:
                pass
    return counts, meta, manifest_dir


def short_list(urls: list[str], k: int = 5) -> str:
    """The first ``k`` of ``urls`` and how many more, for messages."""
    return ", ".join(urls[:k]) + (f" and {len(urls) - k} more" if len(urls) > k else "")


def read_meta(urls: str) -> DataMeta:
    """What a model needs to know about the data at ``urls`` (see :class:`DataMeta`).

    From the manifest when there is one. Otherwise inferred from the first shard with a
    warning: sample shape from the first decodable sample, values {-1,+1} -> spins,
    non-negative integers -> levels, else continuous; no label."""
    mdir = _find_manifest(urls)
    if mdir is not None:
        return meta_from_dict(read_manifest(mdir)["meta"])
    shard_set = resolve_shards(urls, verify_mode="off")
    if shard_set.meta is not None:
        return shard_set.meta
    for url in shard_set.urls:
        inferred = _infer_shard_meta(url)
        if inferred is not None:
            meta, num_values = inferred
            warnings.warn(
                f"{urls}: no {MANIFEST_NAME}; inferred {meta} from {num_values} samples of {url}",
                stacklevel=2,
            )
            return meta
    raise ValueError(f"no decodable sample in any of the shards {short_list(shard_set.urls)}")


def _infer_shard_meta(url: str) -> tuple[DataMeta, int] | None:
    """(meta, number of samples it was inferred from) from the decodable samples of shard
    ``url`` shaped like its first one; None when it has none."""
    buf = tario.read_url(url)
    idx = tario.scan_tar(buf)
    values = []
    for i in range(len(idx)):
        x = _decode_one(buf, idx, i)
        if x is not None and (not values or x.shape == values[0].shape):
            values.append(x)
    if not values:
        return None
    v = np.stack(values)
    if np.isin(v, (-1, 1)).all():
        kind, levels = "spins", None
    elif np.all(v == np.round(v)) and v.min() >= 0:
        kind, levels = "levels", int(v.max()) + 1
    else:
        kind, levels = "continuous", None
    return DataMeta(sample_shape=tuple(v.shape[1:]), data_kind=kind, num_levels=levels), len(v)


def _decode_one(buf: bytes, idx: tario.TarIndex, i: int) -> np.ndarray | None:
    """Sample ``i``'s x without a known shape (only used to infer meta)."""
    import io

    try:
        if idx.offset["npy"][i] >= 0:
            o, s = int(idx.offset["npy"][i]), int(idx.size["npy"][i])
            a = np.load(io.BytesIO(buf[o:o + s]), allow_pickle=False)
            return a if a.dtype.kind in "biuf" else None
        if idx.offset["png"][i] >= 0:
            o, s = int(idx.offset["png"][i]), int(idx.size["png"][i])
            return tario.decode_png(buf[o:o + s])
    except Exception:  # noqa: BLE001 - any undecodable member is just not a sample
        return None
    return None
