"""Reading a whole reference shard set into memory, once, for evaluation.

The training stream (``pipeline.data.stream``) is an infinite, shuffled iterator; an
evaluation wants every sample of a split exactly once, with its per-sample metadata
(temperature, class). This reads the shards with the project's tar reader
(``pipeline.data.tario``) in shard order. The data sets evaluated here (Ising lattices,
digits, mixtures) fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import tario
from pipeline.data.meta import DataMeta
from pipeline.data.shards import read_manifest
from pipeline.data.stream import read_meta, resolve_shards

SPLITS = ("train", "validation", "all")


@dataclass
class ReferenceSet:
    x: np.ndarray  # float32 [N, *sample_shape], values as stored (spins +-1, levels, reals)
    json: list[dict[str, Any]]  # per-sample metadata ({} when a sample has none)
    cls: np.ndarray | None  # int64 [N] class indices, when the samples carry them
    meta: DataMeta
    manifest: dict[str, Any] | None  # the shard directory's manifest, when there is one
    split: str

    def __len__(self) -> int:
        return len(self.x)

    def json_column(self, key: str) -> np.ndarray | None:
        """float64 [N] of a numeric json field present in every sample, else None."""
        values = [d.get(key) for d in self.json]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            return None
        return np.asarray(values, dtype=np.float64)

    def subset(self, mask: np.ndarray) -> "ReferenceSet":
        return ReferenceSet(
            x=self.x[mask], json=[d for d, m in zip(self.json, mask) if m],
            cls=None if self.cls is None else self.cls[mask], meta=self.meta,
            manifest=self.manifest, split=self.split,
        )


def _read_shard(url: str, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    buf = tario.read_url(url)
    idx = tario.scan_tar(buf)
    if idx.problem:
        raise ValueError(f"shard {url} is damaged ({idx.problem}); repair or re-create it before evaluating")
    x, valid = tario.decode_npy_batch(buf, idx.offset["npy"], idx.size["npy"], sample_shape)
    for i in np.flatnonzero(~valid & (idx.offset["png"] >= 0)):
        o, s = int(idx.offset["png"][i]), int(idx.size["png"][i])
        a = tario.decode_png(buf[o:o + s])
        if a.shape == sample_shape:
            x[i], valid[i] = a, True
    if not valid.all():
        bad = [idx.keys[i] for i in np.flatnonzero(~valid)[:5]]
        raise ValueError(f"shard {url}: samples {bad} have no decodable array of shape {sample_shape}")
    metas = []
    for i in range(len(idx)):
        o = int(idx.offset["json"][i])
        metas.append(tario.decode_json(buf[o:o + int(idx.size["json"][i])]) if o >= 0 else {})
    cls = None
    if (idx.offset["cls"] >= 0).all() and len(idx):
        cls = np.array([tario.decode_cls(buf[int(o):int(o) + int(s)])
                        for o, s in zip(idx.offset["cls"], idx.size["cls"])], dtype=np.int64)
    return x, metas, cls


def load_reference(urls: str, *, split: str = "all") -> ReferenceSet:
    """Every sample of ``split`` ("train", "validation" or "all") of the shard set at ``urls``
    (a directory with manifest.json, a manifest path, tar path(s) in brace notation).

    Without a manifest there are no splits: every shard is read whatever ``split`` says.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = read_meta(urls)
    parts_splits = ("train", "validation") if split == "all" else (split,)
    xs, metas, clss = [], [], []
    manifest = None
    seen: set[str] = set()
    for s in parts_splits:
        try:
            shard_set = resolve_shards(urls, split=s, verify_mode="size")
        except ValueError as e:
            if split == "all" and "lists no" in str(e):
                continue  # e.g. a set written with --val-fraction 0 has no validation shards
            raise
        if shard_set.manifest_dir is not None:
            manifest = read_manifest(shard_set.manifest_dir)
        for url in shard_set.urls:
            if url in seen:  # without a manifest both "splits" are the same shards
                continue
            seen.add(url)
            x, m, c = _read_shard(url, tuple(meta.sample_shape))
            xs.append(x)
            metas.extend(m)
            clss.append(c)
    if not xs or sum(len(x) for x in xs) == 0:
        raise ValueError(f"{urls}: no samples in split {split!r}")
    cls = np.concatenate(clss) if all(c is not None for c in clss) else None
    return ReferenceSet(x=np.concatenate(xs), json=metas, cls=cls, meta=meta, manifest=manifest, split=split)


def has_split(urls: str, split: str) -> bool:
    """Whether ``urls`` is a manifest shard set listing shards of ``split``."""
    p = Path(urls)
    d = p.parent if p.name == "manifest.json" else p
    if not (d / "manifest.json").is_file():
        return False
    return any(s["split"] == split for s in read_manifest(d)["shards"])
