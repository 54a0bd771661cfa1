"""``pipeline bench data --scale``: an epoch of a million samples on 2 ranks x 2 workers, in
bounded memory, beside webdataset's own pipeline and Hugging Face ``datasets``.

The data: ``--scale-samples`` (default 1,000,000) 64x64 float16 fields (white noise smoothed
by a 3x3 box filter on the torus; only the bytes matter here) in ``--scale-shards`` (default
256) shards written under ``--work-dir``/scale (or reused when a complete set with the same
parameters is there). The tars are assembled with numpy, header by header, one vectorised
pass per shard, so writing costs about what the disk does; every member is a plain ustar
``KEY.npy`` that webdataset, HF ``datasets`` and :mod:`pipeline.data.tario` all read.

Each loader runs as 2 processes (rank 0 and 1 of world size 2, no process group: the
stream's order is a pure function of rank and world size) with 2 DataLoader workers each,
shuffle buffer ``--scale-shuffle-buffer``, batch 64, decoding to float32 tensors. A rank
times everything after its first batch (worker start-up) up to the end of its share of the
epoch; samples/s of a loader is the samples of both ranks over the slower rank's time.

* ours, local disk: the whole epoch, and the first quarter of the shards (the
  ``rss_growth_ratio``: peak RSS per rank of the whole set over the quarter, 1M vs 250k).
* webdataset: ``WebDataset(...)`` (shards split over ranks and workers, shard shuffle, a
  ``.shuffle(buffer)`` of the same size, ``.decode()``), ``WebLoader``; the whole epoch.
  It has no exact resume: a restart replays or skips. ``ratio_vs_webdataset`` = ours / it.
* HF ``datasets``: the streaming webdataset builder, ``split_dataset_by_node``, a shuffle
  buffer of the same size; on the first quarter of the shards (a whole epoch of it does not
  fit the bench's budget on 2 cores), against ours on the same quarter.
* loopback S3 (moto in its own process, holding the objects in memory): ours on the first
  ``--scale-s3-shards`` shards (default 16), against ours on the same shards from disk.

Peak RSS: per rank, the main process (``ru_maxrss``) plus its largest DataLoader worker
(``RUSAGE_CHILDREN``'s ``ru_maxrss`` is the largest child's); a worker's own peak is
compared with its bound: the RSS it forked with (the rank's before streaming) plus a window
(``shuffle buffer`` samples decoded to float32, its largest whole-shard overshoot included)
plus two shards' bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.rss import proc_status_mb

SIDE = 64
SAMPLE_SHAPE = (1, SIDE, SIDE)
BATCH = 64
NUM_RANKS = 2
NUM_WORKERS = 2


# ------------------------------------------------------------------------- writing shards


def _npy_header() -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": SAMPLE_SHAPE})
    return buf.getvalue()


def _tar_header_template(size: int) -> np.ndarray:
    """A ustar header of a regular file of ``size`` bytes, name and checksum left blank."""
    h = bytearray(512)
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = f"{size:011o}\0".encode()
    h[136:148] = b"00000000000\0"  # mtime 0: identical parameters give identical bytes
    h[148:156] = b" " * 8  # checksum counts as spaces
    h[156] = ord("0")
    h[257:265] = b"ustar\x0000"
    return np.frombuffer(bytes(h), dtype=np.uint8).copy()


def shard_rows(first_index: int, x: np.ndarray) -> np.ndarray:
    """The members of one tar (uint8 [n, bytes per member]; the archive is their bytes
    followed by :data:`END`): members ``KEY.npy`` (KEY = 8-digit global index) holding ``x[i]``
    (float16 [n, *SAMPLE_SHAPE]), assembled in one vectorised pass: headers from a template,
    names and checksums per row."""
    n = len(x)
    npy = np.frombuffer(_npy_header(), dtype=np.uint8)
    size = len(npy) + x[0].nbytes
    member = 512 + -(-size // 512) * 512
    rows = np.zeros((n, member), dtype=np.uint8)
    rows[:, :512] = _tar_header_template(size)
    keys = first_index + np.arange(n, dtype=np.int64)
    digits = (keys[:, None] // 10 ** np.arange(7, -1, -1)) % 10 + ord("0")
    rows[:, 0:8] = digits
    rows[:, 8:12] = np.frombuffer(b".npy", dtype=np.uint8)
    check = rows[:, :512].sum(1, dtype=np.int64)
    rows[:, 148:154] = (check[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + ord("0")
    rows[:, 154] = 0
    rows[:, 155] = ord(" ")
    rows[:, 512:512 + len(npy)] = npy
    rows[:, 512 + len(npy):512 + size] = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8)
    return rows


END = bytes(1024)  # two zero blocks end a tar archive


def smooth_fields(rng: np.random.Generator, n: int) -> np.ndarray:
    """float16 [n, 1, 64, 64]: integer white noise in [-8, 8) under a 3x3 box filter on the
    torus, over 16 (exact in float16; integers keep the generation at memory speed)."""
    z = rng.integers(-8, 8, (n, SIDE, SIDE), dtype=np.int8).astype(np.int16)
    z = z + np.roll(z, 1, axis=1) + np.roll(z, -1, axis=1)
    z = z + np.roll(z, 1, axis=2) + np.roll(z, -1, axis=2)
    x = z.astype(np.float16)
    x *= np.float16(1 / 16)
    return x[:, None]


def _sha256(rows: np.ndarray) -> str:
    h = hashlib.sha256(rows.data)
    h.update(END)
    return h.hexdigest()


def check_sizes(num_samples: int, num_shards: int, s3_shards: int) -> None:
    """ConfigError unless every epoch the bench streams (all shards, the first quarter, the
    first ``s3_shards``) gives each rank two batches at least (the first is not timed)."""
    from pipeline.errors import ConfigError

    if num_shards > num_samples:
        raise ConfigError(f"--scale-shards {num_shards} exceeds --scale-samples {num_samples}")
    smallest = num_samples // num_shards * min(max(1, num_shards // 4), s3_shards)
    need = 2 * NUM_RANKS * BATCH
    if smallest < need:
        raise ConfigError(f"--scale-samples {num_samples} in {num_shards} shards leaves {smallest} samples in the "
                          f"smallest epoch streamed (a quarter of the shards, or --scale-s3-shards {s3_shards}); "
                          f"need {need}: 2 batches of {BATCH} on each of {NUM_RANKS} ranks")


def write_scale_shards(out: Path, *, num_samples: int, num_shards: int, seed: int = 0) -> dict[str, Any]:
    """The scale data set under ``out`` (reused when complete with the same parameters);
    its manifest. Shard k holds global indices [k*n/S, (k+1)*n/S)."""
    from pipeline.data import shards
    from pipeline.data.meta import DataMeta, meta_to_dict

    params = {"bench": "scale", "n": num_samples, "shards": num_shards, "side": SIDE, "dtype": "float16",
              "seed": seed}
    if shards.params_match(out, params):
        return shards.read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.MANIFEST_NAME).unlink(missing_ok=True)
    bounds = np.linspace(0, num_samples, num_shards + 1).round().astype(np.int64)
    entries = []
    t0 = time.perf_counter()
    for k in range(num_shards):
        a, b = int(bounds[k]), int(bounds[k + 1])
        rows = shard_rows(a, smooth_fields(np.random.default_rng([seed, k]), b - a))
        name = f"train-{k:06d}.tar"
        tmp = out / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(rows.data)
            f.write(END)
        tmp.replace(out / name)
        entries.append({"name": name, "split": "train", "num_samples": b - a, "num_bytes": rows.nbytes + len(END),
                        "sha256": _sha256(rows)})
    meta = DataMeta(sample_shape=SAMPLE_SHAPE, data_kind="continuous", boundary="periodic")
    manifest = {
        "format": shards.MANIFEST_FORMAT, "source": "bench-scale", "params": params, "meta": meta_to_dict(meta),
        "schema": {"__key__": "str: global index, zero-padded", "npy": {"dtype": "float16", "shape": list(SAMPLE_SHAPE)}},
        "total_samples": num_samples,
        "splits": {"train": {"num_samples": num_samples, "num_shards": num_shards},
                   "validation": {"num_samples": 0, "num_shards": 0}},
        "shards": entries, "info": {},
    }
    shards.write_manifest(out, manifest)
    gb = sum(e["num_bytes"] for e in entries) / 1e9
    print(f"wrote {num_samples} samples ({gb:.2f} GB) in {num_shards} shards in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return manifest


# ------------------------------------------------------------------- one rank of a loader


def _wds_node_split(src, rank: int):
    """webdataset ``nodesplitter``: this rank's shards (every ``NUM_RANKS``-th) without a
    process group (webdataset's ``split_by_node`` asks torch.distributed)."""
    for i, item in enumerate(src):
        if i % NUM_RANKS == rank:
            yield item


def _wds_batch(sample: tuple) -> tuple:
    return (np.asarray(sample[0], dtype=np.float32),)


def _batches_wds(files: list[str], rank: int, shuffle_buffer: int):
    import webdataset as wds

    ds = (wds.WebDataset(files, shardshuffle=len(files), nodesplitter=functools.partial(_wds_node_split, rank=rank),
                         workersplitter=wds.split_by_worker, empty_check=False, seed=0)
          .shuffle(shuffle_buffer).decode().to_tuple("npy").map(_wds_batch).batched(BATCH, partial=True))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=NUM_WORKERS)
    return (b[0] for b in loader), None


def _hf_collate(rows: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(r["npy"], dtype=np.float32) for r in rows])


def _batches_hf(files: list[str], rank: int, shuffle_buffer: int, cache_dir: str):
    import datasets
    import torch
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True,
                               cache_dir=cache_dir)
    ds = split_dataset_by_node(ds, rank=rank, world_size=NUM_RANKS).shuffle(seed=0, buffer_size=shuffle_buffer)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=NUM_WORKERS, collate_fn=_hf_collate)
    return (b for b in loader), None  # lazy: the workers start at the first batch


def _batches_ours(urls: str, rank: int, shuffle_buffer: int):
    from pipeline.data.config import DataConfig
    from pipeline.data.stream import build_stream

    cfg = DataConfig(train_urls=urls, batch_per_rank=BATCH, num_workers=NUM_WORKERS, shuffle_buffer=shuffle_buffer)
    s = build_stream(cfg, rank=rank, world_size=NUM_RANKS, seed=0)
    num_batches = s.samples_per_epoch // (NUM_RANKS * BATCH)  # one epoch: every rank the same count
    return (b["x"] for b, _ in zip(s, range(num_batches))), s


def rank_epoch(spec: dict[str, Any]) -> dict[str, float]:
    """One rank's share of one epoch of loader ``spec["loader"]`` (run in a process of its own):
    samples, the seconds after its first batch, and peak RSS (MiB) of the rank and its largest worker."""
    import gc

    peak = lambda who: resource.getrusage(who).ru_maxrss / 1024  # noqa: E731 - Linux reports KiB
    rank, buf = spec["rank"], spec["shuffle_buffer"]
    if spec["loader"] == "ours":
        batches, stream = _batches_ours(spec["urls"], rank, buf)
    elif spec["loader"] == "webdataset":
        batches, stream = _batches_wds(spec["files"], rank, buf)
    else:
        batches, stream = _batches_hf(spec["files"], rank, buf, spec["cache_dir"])
    start_rss = proc_status_mb("VmRSS")  # what the workers fork from (the loaders are lazy)
    n = len(next(batches))  # worker start-up is not throughput
    first, t0 = n, time.perf_counter()
    for x in batches:
        assert tuple(x.shape[1:]) == SAMPLE_SHAPE and x.dtype.itemsize == 4, (x.shape, x.dtype)
        n += len(x)
    seconds = time.perf_counter() - t0
    if stream is not None:
        stream.close()
    del batches
    gc.collect()  # the DataLoader's workers are joined, so RUSAGE_CHILDREN counts them
    return {"samples": n, "timed_samples": n - first, "seconds": seconds, "start_rss_mb": start_rss,
            # Workers are forked, not exec'd: their ru_maxrss is their own peak, the pages
            # they share with the rank included (RUSAGE_CHILDREN's is the largest worker's).
            "main_peak_mb": proc_status_mb("VmHWM"), "worker_peak_mb": peak(resource.RUSAGE_CHILDREN)}


def _rank_cli() -> None:
    print(json.dumps(rank_epoch(json.loads(sys.argv[1]))), flush=True)


def epoch_on_ranks(loader: str, *, shuffle_buffer: int, urls: str = "", files: list[str] | None = None,
                   cache_dir: str = "") -> dict[str, Any]:
    """One epoch of ``loader`` on ``NUM_RANKS`` processes at once; their figures and the
    loader's samples/s (timed samples of all ranks over the slowest rank's seconds)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = "from pipeline.bench.data_scale import _rank_cli; _rank_cli()"
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(
        {"loader": loader, "rank": r, "shuffle_buffer": shuffle_buffer, "urls": urls, "files": files or [],
         "cache_dir": cache_dir})], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for r in range(NUM_RANKS)]
    ranks = []
    for r, p in enumerate(procs):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{loader} rank {r} exited {p.returncode}:\n{err[-4000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(r["seconds"] for r in ranks)
    return {"ranks": ranks, "num_samples": sum(r["samples"] for r in ranks),
            "samples_per_s": sum(r["timed_samples"] for r in ranks) / seconds,
            "peak_rss_mb": max(r["main_peak_mb"] + r["worker_peak_mb"] for r in ranks),
            "worker_peak_rss_mb": max(r["worker_peak_mb"] for r in ranks)}


# ---------------------------------------------------------------------------- the bench


def _say(name: str, r: dict[str, Any], bytes_per_sample: float) -> None:
    per_worker = r["samples_per_s"] / (NUM_RANKS * NUM_WORKERS)
    ranks = " / ".join(f"{x['main_peak_mb'] + x['worker_peak_mb']:.0f}" for x in r["ranks"])
    print(f"{name:34s} {r['num_samples']:8d} samples  {r['samples_per_s']:9.0f} samples/s "
          f"({per_worker:7.0f} per worker, {per_worker * bytes_per_sample / 1e6:6.1f} MB/s per worker)  "
          f"peak RSS per rank {ranks} MiB (main + largest worker)", flush=True)


def run_scale(root: Path, *, num_samples: int, num_shards: int, shuffle_buffer: int, s3_shards: int,
              train_rate: dict[str, float] | None = None) -> dict[str, Any]:
    """The figures of the module docstring; ``train_rate``: the fed preset's training step
    (``samples_per_s``, ``preset``, ...) for ``ratio_vs_train_step``."""
    manifest = write_scale_shards(root / "scale", num_samples=num_samples, num_shards=num_shards)
    d = root / "scale"
    files = [str(d / e["name"]) for e in manifest["shards"]]
    bytes_per_sample = sum(e["num_bytes"] for e in manifest["shards"]) / num_samples
    quarter = max(1, num_shards // 4)
    quarter_urls = f"{d}/train-{{000000..{quarter - 1:06d}}}.tar"
    s3_shards = min(s3_shards, num_shards)
    s3_urls = f"{d}/train-{{000000..{s3_shards - 1:06d}}}.tar"
    runs: dict[str, dict[str, Any]] = {}

    def epoch(name: str, loader: str, **kw) -> dict[str, Any]:
        runs[name] = epoch_on_ranks(loader, shuffle_buffer=shuffle_buffer, **kw)
        _say(name, runs[name], bytes_per_sample)
        return runs[name]

    ours = epoch("ours, local, all shards", "ours", urls=str(d))
    ours_q = epoch(f"ours, local, first {quarter} shards", "ours", urls=quarter_urls)
    wds = epoch("webdataset, local, all shards", "webdataset", files=files)
    hf = epoch(f"hf datasets, local, first {quarter} shards", "hf", files=files[:quarter],
               cache_dir=str(root / "hf-cache"))
    ours_s3_local = epoch(f"ours, local, first {s3_shards} shards", "ours", urls=s3_urls)
    runs[f"ours, loopback S3, first {s3_shards} shards"] = ours_s3 = _s3_epoch(d, files[:s3_shards], shuffle_buffer)
    _say(f"ours, loopback S3, first {s3_shards} shards", ours_s3, bytes_per_sample)
    bound = _worker_rss_bound_mb(manifest, shuffle_buffer, max(r["start_rss_mb"] for r in ours["ranks"]))
    out: dict[str, Any] = {
        "num_samples": ours["num_samples"],
        "num_shards": num_shards,
        "data_bytes": int(bytes_per_sample * num_samples),
        "samples_per_s": ours["samples_per_s"],
        "mb_per_s": ours["samples_per_s"] * bytes_per_sample / 1e6,
        "webdataset_samples_per_s": wds["samples_per_s"],
        "ratio_vs_webdataset": ours["samples_per_s"] / wds["samples_per_s"],
        "hf_samples_per_s": hf["samples_per_s"],
        "ratio_vs_hf": ours_q["samples_per_s"] / hf["samples_per_s"],
        "s3_samples_per_s": ours_s3["samples_per_s"],
        "s3_ratio_vs_local": ours_s3["samples_per_s"] / ours_s3_local["samples_per_s"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "peak_rss_mb_quarter": ours_q["peak_rss_mb"],
        "rss_growth_ratio": ours["peak_rss_mb"] / ours_q["peak_rss_mb"],
        "worker_peak_rss_mb": ours["worker_peak_rss_mb"],
        "worker_rss_bound_mb": bound,
        "worker_rss_within_bound": ours["worker_peak_rss_mb"] <= bound,
        "counts": {"ours": ours["num_samples"], "webdataset": wds["num_samples"], "hf": hf["num_samples"],
                   "ours_quarter": ours_q["num_samples"], "quarter": sum(e["num_samples"] for e in manifest["shards"][:quarter]),
                   "s3": ours_s3["num_samples"]},
        "subsets": {"hf_shards": quarter, "s3_shards": s3_shards, "rss_small_shards": quarter},
        "runs": runs,
        "config": {"ranks": NUM_RANKS, "workers_per_rank": NUM_WORKERS, "batch_per_rank": BATCH,
                   "shuffle_buffer": shuffle_buffer, "sample_shape": list(SAMPLE_SHAPE), "dtype": "float16",
                   "bytes_per_sample": bytes_per_sample},
    }
    if train_rate is not None:
        out["train_step"] = train_rate
        out["ratio_vs_train_step"] = ours["samples_per_s"] / train_rate["samples_per_s"]
    return out


def _worker_rss_bound_mb(manifest: dict[str, Any], shuffle_buffer: int, start_rss_mb: float) -> float:
    """What a worker may hold: the RSS it forked with, a window decoded to float32 (at least
    ``shuffle_buffer`` samples, whole shards, so up to one shard more) and two shards' bytes."""
    largest = max(manifest["shards"], key=lambda e: e["num_bytes"])
    window = (shuffle_buffer + largest["num_samples"]) * 4 * int(np.prod(SAMPLE_SHAPE))
    return start_rss_mb + (window + 2 * largest["num_bytes"]) / 2**20


def _s3_epoch(d: Path, files: list[str], shuffle_buffer: int) -> dict[str, Any]:
    """Ours over ``files`` uploaded (with a manifest listing just them) to a loopback S3 server."""
    import boto3

    from pipeline.bench.common import loopback_s3
    from pipeline.data import shards, storage

    manifest = shards.read_manifest(d)
    names = {Path(f).name for f in files}
    manifest["shards"] = [e for e in manifest["shards"] if e["name"] in names]
    n = sum(e["num_samples"] for e in manifest["shards"])
    manifest["total_samples"] = n
    manifest["splits"]["train"] = {"num_samples": n, "num_shards": len(names)}
    manifest["params"] = {**manifest["params"], "subset_shards": len(names)}
    with loopback_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        for f in files:
            storage.upload(f, f"s3://bench/scale/{Path(f).name}")
        shards.write_manifest("s3://bench/scale", manifest)  # last
        return epoch_on_ranks("ours", shuffle_buffer=shuffle_buffer, urls="s3://bench/scale/")


def main_scale(args) -> dict[str, Any]:
    """``pipeline bench data --scale``: the data set under ``--work-dir`` (kept, reused) or a
    temporary directory (removed), the fed preset's real training step, then the epochs."""
    import os
    import shutil
    import tempfile

    from pipeline.bench.common import load_avg, preset_step_rate
    from pipeline.bench.train import write_spin_shards

    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        before = load_avg()
        step = None
        if args.scale_train_steps > 0:
            spins = write_spin_shards(root / "train-data", size=SIDE, num_samples=64)
            step = preset_step_rate(args.scale_train_config, spins, root / "train-run", num_steps=args.scale_train_steps,
                                    threads=os.cpu_count() or 1, overrides=("engine.backend=accelerate", "engine.mixed_precision=no",
                                               "vdm.sample_steps=1"))
            print(f"training step of {args.scale_train_config} (64x64, DDP fp32 on CPU) consumes "
                  f"{step['samples_per_s']:.2f} samples/s (load {step['load_avg']})", flush=True)
        out = run_scale(root, num_samples=args.scale_samples, num_shards=args.scale_shards,
                        shuffle_buffer=args.scale_shuffle_buffer, s3_shards=args.scale_s3_shards, train_rate=step)
        out["load_avg"] = [before, load_avg()]
        print(f"load average {before} -> {out['load_avg'][1]}", flush=True)
        return out
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
