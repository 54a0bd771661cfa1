"""``pipeline bench data``: throughput of the data stream, side by side with a Hugging Face
``datasets`` iterable loader over the same shards and with a training step's consumption.

All three are measured in one run on the same machine, so the ratios are meaningful even
where absolute figures are not (shared CPUs); the load average goes with the figures. The
training step is the real one of the preset being fed (``--train-config``, default the
quickstart's): ``pipeline train`` in a fresh process (one thread) for ``--train-steps``
steps on unlabelled spins of the bench's lattice size, samples/s from the loop's own step
timer (the median logging interval after the first; loop, model, optimizer, EMA and data
stream included). Stream and HF loader both use 2 DataLoader workers, shuffling on,
decoding on, batches of ``batch_size``. The first batch (worker start-up) is excluded from
the timing. Memory: a fresh process streams one whole epoch of two data sets that differ
only in length (default 4x); `rss_growth_ratio` is the ratio of their peak RSS (the
process's ``VmHWM`` plus its largest worker's), ~1 when memory is bounded by the shuffle
buffer and shard size, not the data set. The last stdout line is one JSON object.

Object storage: ``--s3`` also streams the Ising shards from an S3 API server on loopback
(moto's server, ``pip install 'moto[server]'``, started in its own process on a free
127.0.0.1 port; the shards uploaded to it) with the same settings, and reports
``s3_samples_per_s`` and ``s3_ratio_vs_local``. moto is a Python server on the same CPUs,
so the ratio bounds from below what a real store on a network with bandwidth to spare gives.

``--scale``: a million 64x64 float16 samples on 2 ranks x 2 workers, beside webdataset and
HF ``datasets``, in bounded memory (:mod:`pipeline.bench.data_scale`).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.bench.common import load_avg, loopback_s3, preset_step_rate
from pipeline.bench.train import write_spin_shards
from pipeline.errors import ConfigError


def _rate(batches, num_batches: int, batch_size_of: Callable[[Any], int]) -> float:
    it = iter(batches)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(num_batches):
        n += batch_size_of(next(it))
    return n / (time.perf_counter() - t0)


def stream_rate(urls: str, *, batch_size: int, num_batches: int, num_workers: int, label_key: str | None,
                shuffle_buffer: int) -> float:
    from pipeline.data.config import DataConfig
    from pipeline.data.stream import build_stream

    cfg = DataConfig(train_urls=urls, batch_per_rank=batch_size, num_workers=num_workers,
                     shuffle_buffer=shuffle_buffer, label_key=label_key)
    s = build_stream(cfg, rank=0, world_size=1, seed=0)
    try:
        return _rate(s, num_batches, lambda b: len(b["x"]))
    finally:
        s.close()


def s3_stream_rate(local_dir: Path, **kw) -> float:
    """:func:`stream_rate` of the shard set ``local_dir`` uploaded to a loopback S3 server."""
    import boto3

    from pipeline.data import storage

    with loopback_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        for f in sorted(local_dir.glob("*.tar")) + [local_dir / "manifest.json"]:  # manifest last
            storage.upload(str(f), f"s3://bench/{local_dir.name}/{f.name}")
        return stream_rate(f"s3://bench/{local_dir.name}/", **kw)


def hf_rate(files: list[str], *, batch_size: int, num_batches: int, num_workers: int, label_key: str | None,
            shuffle_buffer: int, cache_dir: str) -> float:
    """HF ``datasets`` streaming webdataset loader -> shuffle buffer -> torch DataLoader."""
    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True,
                               cache_dir=cache_dir)
    ds = ds.shuffle(seed=0, buffer_size=shuffle_buffer).repeat(None)

    def collate(rows):
        out = {"x": torch.as_tensor(np.stack([np.asarray(r["npy"], dtype=np.float32) for r in rows]))}
        if label_key == "cls":
            out["label"] = torch.as_tensor([int(r["cls"]) for r in rows])
        elif label_key is not None:
            out["label"] = torch.as_tensor([float(r["json"][label_key]) for r in rows])
        return out

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    return _rate(loader, num_batches, lambda b: len(b["x"]))


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


_EPOCH_RSS = """
import json, resource, sys
from pipeline.data.config import DataConfig
from pipeline.data.stream import build_stream
from pipeline.errors import ConfigError
cfg = DataConfig(train_urls=sys.argv[1], batch_per_rank=64, num_workers=int(sys.argv[2]), shuffle_buffer=int(sys.argv[3]))
s = build_stream(cfg, rank=0, world_size=1, seed=0)
it = iter(s)
for _ in range(s.samples_per_epoch // 64):
    next(it)
s.close()
# Not ru_maxrss of this process: started by fork + exec, it inherits the parent's RSS at the fork.
from pipeline.bench.rss import proc_status_mb
print(json.dumps({"self": proc_status_mb("VmHWM"), "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def epoch_rss_by_size(root: Path, *, sizes: tuple[int, ...], size: int, num_workers: int, shuffle_buffer: int,
                      samples_per_shard: int) -> dict[int, float]:
    """Peak RSS (MiB, main process + workers) of a fresh process streaming one whole epoch of
    data sets that differ only in length: bounded memory means it does not grow with them."""
    import subprocess
    import sys

    from pipeline.data import shards, sources

    out = {}
    for n in sizes:
        d = root / f"rss-{n}"
        params = {"bench": "rss", "n": n, "size": size, "per_shard": samples_per_shard}
        if not shards.params_match(d, params):
            rng = np.random.default_rng(n)
            arr = root / f"rss-{n}.npy"
            np.save(arr, np.where(rng.random((n, size, size)) < 0.5, -1, 1).astype(np.int8))
            data = sources.npy(str(arr), add_channel_dim=True, data_kind="spins")
            shards.write_shards(data, d, source="npy", params=params, samples_per_shard=samples_per_shard,
                                val_fraction=0.0, seed=0)
            arr.unlink()
        r = subprocess.run([sys.executable, "-c", _EPOCH_RSS, str(d), str(num_workers), str(shuffle_buffer)],
                           capture_output=True, text=True, check=True)
        peak = json.loads(r.stdout.strip().splitlines()[-1])
        out[n] = peak["self"] + peak["children"]
        print(f"one epoch of {n:7d} samples: peak RSS {out[n]:.0f} MiB (main + workers)", flush=True)
    return out


def _dataset_rates(root: Path, *, size: int, num_per_temperature: int, samples_per_shard: int,
                   **kw) -> dict[str, Any]:
    """Our stream's and HF datasets' samples/s on Ising (two temperatures, label = temperature)
    and digits (label = class) shards, written under ``root`` unless already there."""
    from pipeline.data import shards, sources

    sets = {
        "ising": (lambda: sources.ising([2.0, 3.0], size, num_per_temperature, seed=0), "temperature"),
        "digits": (sources.digits, "cls"),
    }
    results: dict[str, Any] = {}
    for name, (make, label_key) in sets.items():
        d = root / name
        params = {"bench": name, "size": size, "n": num_per_temperature, "per_shard": samples_per_shard}
        if not shards.params_match(d, params):
            shards.write_shards(make(), d, source=name, params=params, samples_per_shard=samples_per_shard,
                                val_fraction=0.0, seed=0)
        files = [str(d / s["name"]) for s in shards.read_manifest(d)["shards"]]
        ours = stream_rate(str(d), label_key=label_key, **kw)
        hf = hf_rate(files, cache_dir=str(root / "hf-cache"), label_key=label_key, **kw)
        results[name] = {"samples_per_s": ours, "hf_samples_per_s": hf, "ratio_vs_hf": ours / hf,
                         "num_samples": shards.read_manifest(d)["total_samples"]}
        print(f"{name:7s} stream {ours:10.0f} samples/s   hf datasets {hf:9.0f} samples/s   "
              f"ratio {ours / hf:6.1f}", flush=True)
    return results


def _s3_figures(root: Path, local_rate: float, **kw) -> dict[str, float]:
    """The Ising shards streamed from a loopback S3 server, beside the local-disk rate."""
    s3_rate = s3_stream_rate(root / "ising", label_key="temperature", **kw)
    figures = {"s3_samples_per_s": s3_rate, "s3_ratio_vs_local": s3_rate / local_rate}
    print(f"ising   stream from loopback S3 {s3_rate:10.0f} samples/s   "
          f"ratio vs local disk {figures['s3_ratio_vs_local']:5.2f}", flush=True)
    return figures


def run(
    *,
    work_dir: str | None = None,
    size: int = 16,
    num_per_temperature: int = 10_000,
    batch_size: int = 64,
    num_batches: int = 300,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    samples_per_shard: int = 1000,
    train_config: str = "configs/quickstart.yaml",
    num_train_steps: int = 30,
    rss_sizes: tuple[int, ...] = (10_000, 40_000),
    s3: bool = False,
) -> dict[str, Any]:
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        work_dir = tmp.name
    root = Path(work_dir)
    load_before = load_avg()
    try:
        kw = dict(batch_size=batch_size, num_batches=num_batches, num_workers=num_workers,
                  shuffle_buffer=shuffle_buffer)
        results = _dataset_rates(root, size=size, num_per_temperature=num_per_temperature,
                                 samples_per_shard=samples_per_shard, **kw)
        s3_figures = _s3_figures(root, results["ising"]["samples_per_s"], **kw) if s3 else {}
        # The quickstart's own kind of data: unlabelled size x size spins (the Ising sets carry a label).
        spins = write_spin_shards(root / "train-data", size=size, num_samples=4 * batch_size)
        # One thread, as `pipeline bench train` does: a small model's 2 OpenMP threads stall on a
        # loaded machine (seen: 3-5 s a quickstart step at load 10, against 0.2 s).
        step = preset_step_rate(train_config, spins, root / "train-run", num_steps=num_train_steps, threads=1)
        train_rate = step["samples_per_s"]
        print(f"training step of {train_config} on {size}x{size} spins consumes {train_rate:.0f} samples/s "
              f"(load {step['load_avg']})", flush=True)
        rss = epoch_rss_by_size(root, sizes=rss_sizes, size=size, num_workers=num_workers,
                                shuffle_buffer=shuffle_buffer, samples_per_shard=samples_per_shard)
        ising = results["ising"]
        return {
            "peak_rss_mb_by_dataset_size": {str(k): v for k, v in rss.items()},
            "rss_growth_ratio": rss[max(rss)] / rss[min(rss)],
            "samples_per_s": ising["samples_per_s"],
            "hf_samples_per_s": ising["hf_samples_per_s"],
            "ratio_vs_hf": ising["ratio_vs_hf"],
            "train_step_samples_per_s": train_rate,
            "ratio_vs_train_step": ising["samples_per_s"] / train_rate,
            "train_step": step,
            "peak_rss_mb": _peak_rss_mb(resource.RUSAGE_SELF),
            "peak_rss_children_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
            **s3_figures,
            "datasets": results,
            "load_avg": [load_before, load_avg()],
            "config": {"size": size, "batch_size": batch_size, "num_batches": num_batches,
                       "num_workers": num_workers, "shuffle_buffer": shuffle_buffer,
                       "samples_per_shard": samples_per_shard},
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "data", help="data stream samples/s vs HF datasets and vs a training step",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work-dir", help="keep shards here (reused when parameters match); default: a temp dir")
    p.add_argument("--size", type=int, default=16, help="Ising lattice side (default 16)")
    p.add_argument("--num-samples", type=int, default=10_000, help="Ising samples per temperature (2 temperatures)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-batches", type=int, default=300, help="timed batches per loader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders")
    p.add_argument("--train-steps", type=int, default=30, help="training steps of the preset's real step")
    p.add_argument("--train-config", default="configs/quickstart.yaml",
                   help="the preset whose training step the stream feeds (default configs/quickstart.yaml)")
    p.add_argument("--rss-samples", type=int, default=10_000,
                   help="memory check: stream one epoch of this many samples and of 4x as many (default 10000)")
    p.add_argument("--s3", action="store_true",
                   help="also stream the Ising shards from a loopback S3 server (needs moto[server])")
    scale = p.add_argument_group("--scale: an epoch of a million samples in bounded memory (pipeline.bench.data_scale)")
    scale.add_argument("--scale", action="store_true", help="run the scale bench instead (needs moto[server])")
    scale.add_argument("--scale-samples", type=int, default=1_000_000, help="64x64 float16 samples (default 1000000)")
    scale.add_argument("--scale-shards", type=int, default=256, help="shards (default 256)")
    scale.add_argument("--scale-shuffle-buffer", type=int, default=8192, help="every loader's (default 8192)")
    scale.add_argument("--scale-s3-shards", type=int, default=16,
                       help="the loopback S3 leg streams the first this many shards (default 16)")
    scale.add_argument("--scale-train-config", default="configs/scale_10m.yaml",
                       help="the preset fed by 64x64 samples whose real step ratio_vs_train_step compares with")
    scale.add_argument("--scale-train-steps", type=int, default=2,
                       help="its steps, the first not timed (default 2; 0: skip)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    for name in ("size", "num_samples", "batch_size", "num_batches", "train_steps", "rss_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.scale:
        for name in ("scale_samples", "scale_shards", "scale_shuffle_buffer", "scale_s3_shards"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.scale_train_steps < 0:
            raise ConfigError(f"--scale-train-steps must be >= 0, got {args.scale_train_steps}")
        from pipeline.bench.data_scale import check_sizes

        check_sizes(args.scale_samples, args.scale_shards, args.scale_s3_shards)
    if args.s3 or args.scale:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise ConfigError("--s3 and --scale need moto's S3 server: pip install 'moto[server]'") from None
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.scale:
        from pipeline.bench.data_scale import main_scale

        print(json.dumps(main_scale(args)))
        return 0
    out = run(work_dir=args.work_dir, size=args.size, num_per_temperature=args.num_samples,
              batch_size=args.batch_size, num_batches=args.num_batches, num_workers=args.workers,
              train_config=args.train_config, num_train_steps=args.train_steps, rss_sizes=(args.rss_samples, 4 * args.rss_samples), s3=args.s3)
    print(json.dumps(out))
    return 0
