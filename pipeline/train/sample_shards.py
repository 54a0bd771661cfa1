"""``pipeline sample --out DIR``: a sample set written as WebDataset shards, across ranks, resumable.

The set is cut into shards of ``samples_per_shard`` consecutive global indices; shard k is
written by rank k mod world_size, so each rank generates its share. Inside a shard the samples
are drawn in chunks of ``batch_size`` (the last may be shorter), chunk [start, stop) with a
generator seeded from SeedSequence([seed, start]): each sample's noise is a function of the
seed and its global index alone (given the fixed shard and chunk sizes, recorded in the
manifest's ``params``), so 1 and 2 processes give the same samples (mosaicml/streaming's
elastic determinism, for generation). Shards are written with the data layer's writer
(:func:`pipeline.data.shards.write_one_shard`: staged, renamed into place), so a shard file
exists only complete: an interrupted job started again writes only the missing shards, on any
number of processes. The manifest, written last by rank 0, makes ``DIR`` a shard set like any
other (``data.train_urls=DIR``, ``pipeline shards verify DIR``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import shards
from pipeline.data.meta import DataMeta
from pipeline.data.sources import SourceData
from pipeline.errors import ConfigError

SOURCE = "pipeline-sample"
PROGRESS_NAME = ".sampling.json"  # the params of a job under way (checked when it is resumed)


@dataclass(frozen=True)
class ShardPlan:
    """Which global sample indices each shard and each noise chunk holds."""

    num_samples: int
    samples_per_shard: int
    batch_size: int  # samples per noise chunk (and per forward pass)

    def validate(self) -> None:
        for name in ("num_samples", "samples_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    def shard_range(self, k: int) -> tuple[int, int]:
        start = k * self.samples_per_shard
        return start, min(start + self.samples_per_shard, self.num_samples)

    def chunks(self, k: int) -> list[tuple[int, int]]:
        start, stop = self.shard_range(k)
        return [(a, min(a + self.batch_size, stop)) for a in range(start, stop, self.batch_size)]

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))

    @property
    def key_width(self) -> int:
        return max(8, len(str(self.num_samples - 1)))


def shard_name(k: int) -> str:
    return f"train-{k:06d}.tar"


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the noise chunk whose first global index is ``start``."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


def check_out_dir(out: Path, params: dict[str, Any]) -> str:
    """'done', 'resume' (an interrupted job, or a complete set with shards deleted) or 'fresh'
    for ``out``; ConfigError when it holds something else (another
    sample set, other data), so that nothing there is overwritten or mixed."""
    params = json.loads(json.dumps(params))
    if (out / shards.MANIFEST_NAME).is_file():
        old = shards.existing_params(out)
        if old != params:
            raise ConfigError(f"--out {out} holds a shard set made with other parameters ({old}); give a "
                              f"fresh --out directory or delete it")
        listed = shards.read_manifest(out)["shards"]
        for e in listed:
            p = out / e["name"]
            if p.is_file() and p.stat().st_size != e["num_bytes"]:
                raise ConfigError(f"--out {out}: shard {p} has {p.stat().st_size} bytes, its manifest says "
                                  f"{e['num_bytes']} (modified?); delete it to have it drawn again")
        # Shards deleted from a complete set are drawn again (the same samples: same params).
        return "resume" if any(not (out / e["name"]).is_file() for e in listed) else "done"
    progress = out / PROGRESS_NAME
    if progress.is_file():
        old = json.loads(progress.read_text())
        if old != params:
            raise ConfigError(f"--out {out} holds an unfinished sampling job with other parameters ({old}); "
                              f"resume it with those, or give a fresh --out directory")
        return "resume"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not a sample directory written by `pipeline sample` "
                          f"(no {shards.MANIFEST_NAME} or {PROGRESS_NAME}); give a fresh or empty directory")
    return "fresh"


def _sample_dtype(meta: DataMeta) -> np.dtype:
    if meta.data_kind == "spins":
        return np.dtype(np.int8)
    if meta.data_kind == "levels":
        return np.dtype(np.uint8 if (meta.num_levels or 0) <= 256 else np.int32)
    return np.dtype(np.float32)


def _shard_data(x: np.ndarray, labels: torch.Tensor | None, meta: DataMeta, label_key: str) -> SourceData:
    cls, columns = None, {}
    if labels is not None and meta.label_kind == "class":
        cls = labels.numpy().astype(np.int64)
    elif labels is not None:
        columns[label_key] = labels.numpy().astype(np.float64)
    return SourceData(x=x.astype(_sample_dtype(meta)), meta=meta, cls=cls, json_columns=columns)


@dataclass
class SampleJob:
    """Everything a rank needs to draw and write its shards."""

    module: torch.nn.Module
    meta: DataMeta
    plan: ShardPlan
    seed: int
    num_steps: int | None
    sampler: Any  # SamplerConfig or None
    labels: torch.Tensor | None  # [num_samples] or None
    label_key: str
    device: torch.device

    def draw(self, start: int, stop: int) -> np.ndarray:
        g = torch.Generator(device=self.device).manual_seed(chunk_seed(self.seed, start))
        kwargs: dict[str, Any] = {"labels": None if self.labels is None else self.labels[start:stop], "generator": g}
        if self.num_steps is not None:
            kwargs["num_steps"] = self.num_steps
        if self.sampler is not None:
            kwargs["sampler"] = self.sampler
        x = self.module.sample(stop - start, **kwargs).detach().cpu().numpy()
        if not np.all(np.isfinite(x)):
            raise ValueError("the model produced non-finite samples (NaN/Inf); its weights have probably diverged")
        return x

    def write_shard(self, out: Path, k: int) -> None:
        x = np.concatenate([self.draw(a, b) for a, b in self.plan.chunks(k)])
        start, stop = self.plan.shard_range(k)
        lb = None if self.labels is None else self.labels[start:stop].cpu()
        data = _shard_data(x, lb, self.meta, self.label_key)
        shards.write_one_shard(out / shard_name(k), data, first_index=start, key_width=self.plan.key_width)


def run_rank(job: SampleJob, out: Path, rank: int, world_size: int) -> int:
    """Write this rank's missing shards, with a progress line per shard; returns how many it wrote."""
    todo = [k for k in job.plan.shards_of(rank, world_size) if not (out / shard_name(k)).is_file()]
    total = sum(job.plan.shard_range(k)[1] - job.plan.shard_range(k)[0] for k in todo)
    done, t0 = 0, time.perf_counter()
    for i, k in enumerate(todo):
        job.write_shard(out, k)
        a, b = job.plan.shard_range(k)
        done += b - a
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        print(f"sample: rank {rank}/{world_size} shard {k} ({i + 1}/{len(todo)} of this rank's missing) | "
              f"{done}/{total} samples | {rate:.1f} samples/s | eta {eta:.0f}s", file=sys.stderr, flush=True)
    return len(todo)


def write_manifest(out: Path, job: SampleJob, params: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the complete set (rank 0, after every rank has written its shards)."""
    entries = []
    for k in range(job.plan.num_shards):
        p = out / shard_name(k)
        assert p.is_file(), f"shard {p} missing after every rank finished"
        a, b = job.plan.shard_range(k)
        entries.append({"name": p.name, "split": "train", "num_samples": b - a, "num_bytes": p.stat().st_size,
                        "sha256": shards.sha256_file(p)})
    # The schema from a placeholder sample of the same dtype, shape and members (nothing redrawn).
    placeholder = np.zeros((1, *job.meta.sample_shape))
    first = _shard_data(placeholder, None if job.labels is None else job.labels[:1].cpu(), job.meta, job.label_key)
    n = job.plan.num_samples
    manifest = {
        "format": shards.MANIFEST_FORMAT, "source": SOURCE, "params": params,
        "meta": shards.meta_to_dict(job.meta), "schema": shards.sample_schema(first), "total_samples": n,
        "splits": {"train": {"num_samples": n, "num_shards": len(entries)},
                   "validation": {"num_samples": 0, "num_shards": 0}},
        "shards": entries, "info": info,
    }
    shards.write_manifest(out, manifest)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def sample_to_shards(job: SampleJob, out: Path, params: dict[str, Any], info: dict[str, Any], engine) -> int:
    """Every rank's part of a sampling job under ``engine`` (rank, world size, barrier); rank 0
    writes the manifest once all shards exist. Returns 0."""
    rank, world = engine.rank, engine.world_size
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # The progress record before the manifest goes: an interruption from here on still resumes.
        tmp = out / f"{PROGRESS_NAME}.tmp"
        tmp.write_text(json.dumps(params, indent=1) + "\n")
        tmp.replace(out / PROGRESS_NAME)
        (out / shards.MANIFEST_NAME).unlink(missing_ok=True)  # incomplete from now until rewritten
    engine.barrier()
    t0 = time.perf_counter()
    wrote = run_rank(job, out, rank, world)
    wrote_all = int(engine.all_reduce_sum(torch.tensor([float(wrote)], device=engine.device)).item())
    if rank == 0:
        write_manifest(out, job, params, info)
        seconds = time.perf_counter() - t0
        n = job.plan.num_samples
        print(f"wrote {n} samples in {job.plan.num_shards} shards to {out} on {world} process(es): "
              f"{wrote_all} shards drawn now, {job.plan.num_shards - wrote_all} were complete already "
              f"({seconds:.1f} s)", flush=True)
    engine.barrier()
    return 0
