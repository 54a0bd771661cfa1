"""``pipeline bench train``: throughput, scaling, checkpoint cost and memory of the real loop.

Measured side by side in one run, on the same machine, on the quickstart model (a VDM on
16x16 spins, batch 64 per rank by default) with random spin data:

* ``ratio_vs_bare_loop``: steps/s of ``pipeline train`` (1 process, 1 thread) over steps/s
  of a bare PyTorch loop with the same model, batch, optimizer and clipping (forward,
  backward, clip, AdamW step on one fixed batch; no data stream, EMA, NaN check, logging),
  also 1 thread in a fresh process. Target >= 0.95.
* ``dp_efficiency``: samples/s of 2 DDP processes with 1 thread each over samples/s of 1
  process with 2 threads, at the same global batch (equal total threads and work per step).
  Target >= 0.85. Also ``dp_efficiency_vs_2x_1thread``: over twice the 1-process,
  1-thread samples/s (the ideal linear scaling of the 1-thread run).
* ``checkpoint_share``: mean checkpoint save time over the wall time of one checkpoint
  interval (``train.checkpoint_every_steps``, default 100) of the 2-process run:
  save / (interval x step time + save). Target <= 0.02.
* ``peak_rss_mb``: peak resident memory (VmHWM) per rank, max over ranks, of 2-process runs
  under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP (full_shard).

Steps/s of a run is read from its metrics.jsonl (``perf/step_time_s`` per logging interval):
the median over intervals after the first (start-up and the first batch excluded; an
interval holding a checkpoint save is an outlier the median ignores). The last stdout line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.args import backend_list, positive_int
from pipeline.bench.rss import proc_status_mb
from pipeline.run_dir import RunDir

DEFAULT_CHECKPOINT_EVERY_STEPS = 100  # TrainConfig's default interval
BACKENDS = {
    "ddp": ["engine.backend=accelerate"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
    "fsdp": ["engine.backend=accelerate", "engine.fsdp=full_shard"],
}


def _model_overrides(args) -> list[str]:
    extra = ["engine.compile=true"] if getattr(args, "compile", False) else []
    return [*extra,
        "objective=vdm", "vdm.data_kind=spins", f"vdm.num_timesteps={args.num_timesteps}",
        f"vdm.channels={args.channels}", "train.lr=0.0005", "train.warmup_steps=0",
        "data.num_workers=0", "track.wandb=off", "track.progress_bar=false", "train.num_sample_images=16",
    ]


def write_spin_shards(out: Path, *, size: int, num_samples: int, seed: int = 0) -> Path:
    """Random +-1 lattices as a shard set (throughput does not depend on the data's physics)."""
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array([-1, 1], dtype=np.int8), size=(num_samples, 1, size, size))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "x.npy", x)
    _run([sys.executable, "-m", "pipeline", "shards", "npy", "--x", str(out / "x.npy"), "--data-kind", "spins",
          "--out", str(out / "shards"), "--val-fraction", "0", "--samples-per-shard", "512", "--overwrite"],
         env=_env(1))
    return out / "shards"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def _peak_rss_watch(proc: subprocess.Popen, peaks: dict[int, float], stop: threading.Event) -> None:
    """Poll the VmHWM (peak RSS, kernel-maintained) of every descendant that is a training rank."""
    import psutil

    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            kids = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for k in kids:
            try:
                rank = k.environ().get("RANK")
                if rank is None or "-m" not in k.cmdline():
                    continue
                peaks[int(rank)] = max(peaks.get(int(rank), 0.0), proc_status_mb("VmHWM", k.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                continue
        stop.wait(0.1)


def run_train(run_dir: Path, config: Path, shards: Path, overrides: list[str], *, num_processes: int,
              threads: int) -> dict[str, Any]:
    """One `pipeline train` (1 process) or `accelerate launch` (several); its measured figures."""
    train_args = ["train", "--config", str(config), f"run.dir={run_dir}", f"data.train_urls={shards}", *overrides]
    if num_processes == 1:
        cmd = [sys.executable, "-m", "pipeline", *train_args]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "pipeline", *train_args]
    log = run_dir.with_suffix(".log")
    peaks: dict[int, float] = {}
    stop = threading.Event()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
        watcher = threading.Thread(target=_peak_rss_watch, args=(proc, peaks, stop), daemon=True)
        watcher.start()
        rc = proc.wait()
        stop.set()
        watcher.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; log {log}:\n{log.read_text()[-5000:]}")
    return {**read_run(run_dir), "peak_rss_mb": max(peaks.values()) if peaks else float("nan")}


def read_run(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    intervals = [r for r in rows if "event" not in r]
    saves = [r["seconds"] for r in rows if r.get("event") == "checkpoint"]
    if len(intervals) < 2:
        raise ValueError(f"{run_dir}: need at least 2 logging intervals to skip start-up, got {len(intervals)}")
    step_time_s = statistics.median(r["perf/step_time_s"] for r in intervals[1:])
    samples_per_step = intervals[-1]["train/samples_seen"] / intervals[-1]["step"]
    cuda = [r["sys/cuda_max_allocated_gib"] for r in intervals if "sys/cuda_max_allocated_gib" in r]
    return {"steps_per_s": 1.0 / step_time_s, "samples_per_s": samples_per_step / step_time_s,
            "step_time_s": step_time_s, "checkpoint_s": statistics.mean(saves) if saves else float("nan"),
            **({"cuda_peak_gib": max(cuda)} if cuda else {})}


def bare_loop_steps_per_s(config: Path, shards: Path, overrides: list[str], *, num_steps: int,
                          threads: int, log_every_steps: int | None = None) -> float:
    """The same model, batch, AdamW and clipping in a plain PyTorch loop (this process).

    Timed like the pipeline's runs: steps grouped into intervals of ``log_every_steps``, the
    median interval after the first (on a shared machine single steps stall now and then).
    """
    import torch

    from pipeline.config import load_config
    from pipeline.data.stream import build_stream, read_meta
    from pipeline.objectives.registry import build_phases
    from pipeline.objectives.base import StepContext

    torch.set_num_threads(threads)
    cfg = load_config(config, [f"data.train_urls={shards}", "run.dir=unused", *overrides])
    torch.manual_seed(cfg.run.seed)
    phase = build_phases(cfg, read_meta(cfg.data.train_urls))[0]
    model = phase.module.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=phase.lr, betas=phase.betas,
                            weight_decay=cfg.train.weight_decay)
    stream = build_stream(cfg.data, rank=0, world_size=1, seed=cfg.run.seed)
    batch = next(stream)
    stream.close()
    max_norm = cfg.train.grad_clip_norm if cfg.train.grad_clip_norm is not None else float("inf")
    every = log_every_steps or max(1, num_steps // 5)
    interval_s: list[float] = []
    t0 = time.perf_counter()
    for step in range(num_steps):
        out = model(batch, StepContext(step, 0, 1, 0, 1))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0 or step + 1 == num_steps:
            t1 = time.perf_counter()
            interval_s.append((t1 - t0) / (step + 1 - every * (len(interval_s))))
            t0 = t1
    if len(interval_s) < 2:
        raise ValueError(f"need at least 2 intervals of {every} steps to skip start-up, got {len(interval_s)}")
    return 1.0 / statistics.median(interval_s[1:])


def bare_loop_in_subprocess(config: Path, shards: Path, overrides: list[str], *, num_steps: int,
                            threads: int, log_every_steps: int) -> float:
    """The bare loop in a fresh process with the same thread environment as the pipeline run
    (OMP_NUM_THREADS at start-up; torch.set_num_threads in a process that already ran with
    another count was seen to be ~20x slower on a loaded machine)."""
    code = ("import json, sys; from pathlib import Path; from pipeline.bench.train import bare_loop_steps_per_s; "
            "a = json.loads(sys.argv[1]); print(json.dumps(bare_loop_steps_per_s(Path(a['config']), "
            "Path(a['shards']), a['overrides'], num_steps=a['num_steps'], threads=a['threads'], "
            "log_every_steps=a['log_every_steps'])))")
    spec = {"config": str(config), "shards": str(shards), "overrides": overrides, "num_steps": num_steps,
            "threads": threads, "log_every_steps": log_every_steps}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                       env=_env(threads))
    if r.returncode != 0:
        raise RuntimeError(f"bare loop exited {r.returncode}:\n{r.stderr[-5000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1]))


def _setup(args) -> tuple[Path, Path, list[str], dict[str, Any]]:
    """(shards, config, overrides every run shares, the summary's settings)."""
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = write_spin_shards(work / "data", size=args.size, num_samples=args.num_samples)
    config = work / "bench.yaml"
    config.write_text("run: {dir: unused}\ndata: {train_urls: unused}\ntrain: {num_steps: 1}\n")
    n = args.num_steps
    common = [*_model_overrides(args), f"train.num_steps={n}", f"train.log_every_steps={max(1, n // 5)}",
              f"train.checkpoint_every_steps={args.checkpoint_every_steps}"]
    out: dict[str, Any] = {"num_steps": n, "batch_per_rank": args.batch_per_rank, "size": args.size,
                           "channels": args.channels, "checkpoint_every_steps": args.checkpoint_every_steps,
                           "compile": args.compile, "device": args.device}
    return shards, config, common, out


def bench_cuda(args) -> dict[str, Any]:
    """One GPU: the pipeline on 1 process in bf16 (batch 2 x batch_per_rank): samples/s, step
    time, peak GPU memory, and model FLOP utilisation against ``--peak-tflops``."""
    from pipeline.bench.scale import step_flops

    shards, config, common, out = _setup(args)
    batch = 2 * args.batch_per_rank
    r = run_train(Path(shards).parent.parent / "cuda-1proc", config, shards,
                  [*common, f"data.batch_per_rank={batch}", "engine.mixed_precision=bf16"], num_processes=1, threads=1)
    flops = step_flops(args.channels, args.size, batch)
    out.update(samples_per_s=r["samples_per_s"], step_time_s=r["step_time_s"], cuda_peak_gib=r.get("cuda_peak_gib"),
               step_flops=flops, mfu=flops / r["step_time_s"] / (args.peak_tflops * 1e12), checkpoint_s=r["checkpoint_s"])
    return out


def bench(args) -> dict[str, Any]:
    shards, config, common, out = _setup(args)
    work = Path(shards).parent.parent
    n, b = args.num_steps, args.batch_per_rank
    log_every = max(1, n // 5)

    def say(msg: str) -> None:
        print(msg, flush=True)

    # 1 process, 1 thread, batch 2b: the pipeline and the bare loop. One thread: with two, a
    # shared machine's load makes OpenMP stall (seen: 2-20 steps/s for the same run), which
    # would swamp the loop's own overhead.
    single_args = [*common, f"data.batch_per_rank={2 * b}"]
    single = run_train(work / "single-1thread", config, shards, single_args, num_processes=1, threads=1)
    bare = bare_loop_in_subprocess(config, shards, single_args, num_steps=n, threads=1, log_every_steps=log_every)
    out["pipeline_1proc_steps_per_s"] = single["steps_per_s"]
    out["bare_loop_steps_per_s"] = bare
    out["ratio_vs_bare_loop"] = single["steps_per_s"] / bare
    say(f"1 process x 1 thread, batch {2 * b}: pipeline {single['steps_per_s']:.2f} steps/s, "
        f"bare loop {bare:.2f} steps/s, ratio {out['ratio_vs_bare_loop']:.3f}")
    # 1 process, 2 threads, batch 2b: the baseline of data-parallel efficiency.
    single2 = run_train(work / "single-2threads", config, shards, single_args, num_processes=1, threads=2)
    say(f"1 process x 2 threads, batch {2 * b}: {single2['samples_per_s']:.1f} samples/s")

    # 2 processes x 1 thread, batch b each (same global batch), under each backend.
    rss: dict[str, float] = {}
    multi: dict[str, dict] = {}
    for name in args.backends:
        r = run_train(work / f"two-{name}", config, shards, [*common, f"data.batch_per_rank={b}", *BACKENDS[name]],
                      num_processes=2, threads=1)
        multi[name], rss[name] = r, r["peak_rss_mb"]
        say(f"2 processes x 1 thread, {name}: {r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"per rank, checkpoint {r['checkpoint_s']:.3f} s")
    ddp = multi.get("ddp") or next(iter(multi.values()))
    out["samples_per_s_1proc_2threads"] = single2["samples_per_s"]
    out["samples_per_s_2proc_1thread"] = ddp["samples_per_s"]
    out["dp_efficiency"] = ddp["samples_per_s"] / single2["samples_per_s"]
    # The same against twice the 1-thread process: insensitive to how well (or badly, on a
    # loaded machine) one process uses two OpenMP threads.
    out["dp_efficiency_vs_2x_1thread"] = ddp["samples_per_s"] / (2 * single["samples_per_s"])
    save_s, step_s = ddp["checkpoint_s"], 1.0 / ddp["steps_per_s"]
    out["checkpoint_s"] = save_s
    out["checkpoint_share"] = save_s / (args.checkpoint_every_steps * step_s + save_s)
    out["peak_rss_mb"] = rss
    say(f"dp_efficiency {out['dp_efficiency']:.3f}; checkpoint {save_s:.3f} s every "
        f"{args.checkpoint_every_steps} steps of {step_s * 1e3:.1f} ms: share {out['checkpoint_share']:.4f}")
    return out




def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "train",
        help="training loop vs a bare loop, DDP efficiency, checkpoint share, peak RSS per backend",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--num-steps", type=positive_int, default=60,
                   help="steps per run (default 60: about 0.5 s each at the default size on one core)")
    p.add_argument("--batch-per-rank", type=positive_int, default=64,
                   help="batch per rank of the 2-process runs; the 1-process runs use twice this (default 64)")
    p.add_argument("--size", type=positive_int, default=16, help="lattice side (default 16, the quickstart's)")
    p.add_argument("--channels", type=positive_int, default=32, help="vdm.channels (default 32, the quickstart's)")
    p.add_argument("--num-timesteps", type=positive_int, default=50, help="vdm.num_timesteps (default 50)")
    p.add_argument("--num-samples", type=positive_int, default=4096, help="random spin samples in the data set")
    p.add_argument("--checkpoint-every-steps", type=positive_int, default=DEFAULT_CHECKPOINT_EVERY_STEPS)
    p.add_argument("--backends", type=backend_list(BACKENDS), default=list(BACKENDS),
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default all; the first 2-process one "
                        "that is ddp gives dp_efficiency and checkpoint_share)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke size: 10 steps, 8x8, channels 8, T=10, batch 8 (figures meaningless)")
    p.add_argument("--work-dir", help="keep runs and data here (default: a temp dir)")
    p.add_argument("--compile", action="store_true", help="engine.compile=true in every run (torch.compile)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: the figures above; cuda: 1 process on the GPU in bf16, samples/s, step time, "
                        "peak GPU memory, MFU (default cpu)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="peak for MFU, TFLOP/s (default 790: H200 bf16)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.quick:
        args.num_steps, args.size, args.channels, args.num_timesteps = 10, 8, 8, 10
        args.batch_per_rank, args.num_samples = 8, 512
    if args.num_steps < 2:
        raise ValueError(f"--num-steps must be >= 2 (the first logging interval is discarded), got {args.num_steps}")
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
        print(json.dumps(bench_cuda(args)))
        return 0
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the runs stay on the CPU
    out = bench(args)
    for key in ("ratio_vs_bare_loop", "dp_efficiency", "checkpoint_share"):
        if not math.isfinite(out[key]):
            raise RuntimeError(f"{key} is not finite ({out[key]}): see the logs in the work directory")
    print(json.dumps(out))
    return 0
