"""``pipeline bench scale``: what sharding buys at 10M and 100M parameters (issue 18, section 1).

A VDM UNet on 64x64 spin fields (the sizes: ``configs/scale_10m.yaml``, ``configs/scale_100m.yaml``),
or with ``--objective gan`` a conv GAN whose G and D each have that many parameters
(``configs/scale_gan_10m.yaml``; both networks, both optimizers, each phase through the other
network frozen as in training), trains a few optimizer steps on 2 processes (gloo on CPU) under
each backend: DDP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with the optimizer offloaded to the CPU, FSDP2
full_shard and shard_grad_op, and (VDM only) DDP with activation checkpointing. Per rank (max
over ranks):

* model-state memory, counted from the tensors the rank holds (``engines/memory.py``):
  parameters + gradients + optimizer state (Adam moments and any fp32 master copy), summed over
  the phases (a GAN's: D's state after D's backward plus G's after G's);
* peak RSS (``ru_maxrss``; on a GPU, peak allocated CUDA memory too);
* step time (median over the steps after the first), the time to save and to load a checkpoint;
  with ``train.async_checkpoint`` (``ddp_async``, ``fsdp_async``) also the time the save blocks
  (staging) and how much the steps slow down while the write is in flight.

Last line JSON: ``params``, ``mem_ratio_zero3_vs_ddp`` and ``mem_ratio_fsdp_vs_ddp`` (model-state
bytes per rank, full_shard; theory 0.5 on 2 ranks, target <= 0.6), ``step_time_ratio_fsdp_vs_ddp``,
``checkpoint_share`` per backend (save / (checkpoint_every_steps x step time + save), every 100
steps; for the async backends the blocking time in place of the save), ``activation_checkpointing_rss_ratio``, ``mfu`` per backend (model FLOPs per second over
the peak given by ``--peak-tflops``, 790 = an H200's bf16 peak), and every figure per backend.

``--device cuda`` runs the backends on one process (one GPU): memory ratios need 2 ranks and are
not reported there; step time, peak GPU memory and MFU are. Model FLOPs of one step are
counted once with ``torch.utils.flop_counter`` on the same network (forward + backward; a GAN's:
both phases' forward and backward, D's phase including G's forward for the fakes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.bench.args import backend_list, positive_int

PRESETS = {  # vdm.channels / gan.channels for 64x64 fields; parameter counts are measured and printed
    "vdm": {
        "tiny": {"channels": 24, "size": 16},   # 0.1M parameters: the test in make test
        "10m": {"channels": 264, "size": 64},   # 10.3M
        "100m": {"channels": 840, "size": 64},  # 102.8M
    },
    "gan": {  # G mirrors D's widths; parameters of G / D
        "tiny": {"channels": [8, 16], "size": 16},                 # 20k / 2.2k
        "10m": {"channels": [160, 320, 640, 640], "size": 64},     # 10.3M / 10.7M
        "100m": {"channels": [512, 1024, 2048, 2048], "size": 64},  # 101.2M / 109.1M
    },
}
BACKENDS = {
    "ddp": ["engine.backend=accelerate"],
    "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
    "zero3_offload": ["engine.backend=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true"],
    "fsdp": ["engine.backend=accelerate", "engine.fsdp=full_shard"],
    "fsdp_grad_op": ["engine.backend=accelerate", "engine.fsdp=shard_grad_op"],
    "ddp_ac": ["engine.backend=accelerate", "vdm.activation_checkpointing=true"],
    # train.async_checkpoint: checkpoint_share counts what the save blocks (staging) plus how
    # much slower the steps run while the write is in flight
    "ddp_async": ["engine.backend=accelerate", "train.async_checkpoint=true"],
    "fsdp_async": ["engine.backend=accelerate", "engine.fsdp=full_shard", "train.async_checkpoint=true"],
}
CHECKPOINT_EVERY_STEPS = 100


VDM_ONLY_BACKENDS = ("ddp_ac",)  # activation checkpointing is the VDM UNet's (vdm.activation_checkpointing)


def _model_overrides(objective: str, channels) -> list[str]:
    if objective == "gan":
        return ["objective=gan", f"gan.channels=[{','.join(str(c) for c in channels)}]"]
    return ["objective=vdm", "vdm.data_kind=spins", f"vdm.channels={channels}", "vdm.num_timesteps=50"]


def _overrides(args, backend: str) -> list[str]:
    return ["run.dir=unused", "data.train_urls=unused", "train.num_steps=100000", "train.warmup_steps=0",
            *_model_overrides(args.objective, args.channels),
            f"engine.mixed_precision={args.mixed_precision}", "engine.timeout_s=1800", *BACKENDS[backend],
            *([f"engine.deepspeed_config={args.deepspeed_config}"]
              if args.deepspeed_config and "engine.backend=deepspeed" in BACKENDS[backend] else [])]


def _launch(args, backend: str, out: Path) -> dict[str, Any]:
    spec = {"overrides": _overrides(args, backend), "size": args.size, "batch_per_rank": args.batch_per_rank,
            "num_steps": args.num_steps, "out": str(out)}
    worker = ["-m", "pipeline.bench.scale_worker", json.dumps(spec)]
    if args.num_processes == 1:
        cmd = [sys.executable, *worker]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"{backend}: {' '.join(cmd[:8])} ... exited {rc}; log {log}:\n{log.read_text()[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    assert len(ranks) == args.num_processes, (backend, len(ranks))
    return _per_backend(ranks)


def _per_backend(ranks: list[dict]) -> dict[str, Any]:
    """Max over ranks of each per-rank figure (the rank that needs the most sets the machine)."""
    state = {k: max(r["model_state_bytes"][k] for r in ranks) for k in ranks[0]["model_state_bytes"]}
    step_s = max(statistics.median(r["step_s"][1:]) for r in ranks)
    save_s, load_s = max(r["save_s"] for r in ranks), max(r["load_s"] for r in ranks)
    out = {"params": ranks[0]["params"], "params_per_phase": ranks[0]["params_per_phase"],
           "model_state_mb": {k: v / 2**20 for k, v in state.items()},
           "model_state_total_mb": sum(state.values()) / 2**20,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "step_time_s": step_s,
           "save_s": save_s, "load_s": load_s,
           "checkpoint_share": save_s / (CHECKPOINT_EVERY_STEPS * step_s + save_s)}
    if "async_stage_s" in ranks[0]:
        out["async"] = _async_figures(ranks, step_s)
        blocking = out["async"]["blocking_s"]
        out["checkpoint_share_sync"] = out["checkpoint_share"]
        out["checkpoint_share"] = blocking / (CHECKPOINT_EVERY_STEPS * step_s + blocking)
    if ranks[0].get("cuda_peak_gib") is not None:
        out["cuda_peak_gib"] = max(r["cuda_peak_gib"] for r in ranks)
    return out


def _async_figures(ranks: list[dict], step_s: float) -> dict[str, float]:
    """What an asynchronous save costs the run: the staging it blocks for, plus the time the
    steps run while the write is in flight take beyond ``step_s`` each (the write competes for
    the cores and memory bandwidth); max over ranks."""
    stage_s = max(r["async_stage_s"] for r in ranks)
    flight = [r["async_flight_step_s"] for r in ranks]
    slowdown_s = max(max(0.0, sum(f) - len(f) * step_s) for f in flight)
    return {"stage_s": stage_s, "write_s": max(r["async_write_s"] for r in ranks),
            "steps_in_flight": max(len(f) for f in flight), "slowdown_s": slowdown_s,
            "blocking_s": stage_s + slowdown_s}


def step_flops(channels: int, size: int, batch: int) -> float:
    """FLOPs of one training step's network forward + backward (torch.utils.flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import UNet

    net = UNet(1, channels, 64)
    z, emb = torch.randn(batch, 1, size, size), torch.randn(batch, 64)
    with FlopCounterMode(display=False) as counter:
        net(z, emb).sum().backward()
    return float(counter.get_total_flops())


def gan_step_flops(channels: list[int], size: int, batch: int) -> float:
    """FLOPs of one GAN training step (n_critic 1): D's phase (G's forward for the fakes, D's
    forward and backward on real and fake) and G's phase (G and D forward, backward through both)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import load_config
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.base import StepContext
    from pipeline.objectives.registry import build_phases

    cfg = load_config(None, ["run.dir=unused", "data.train_urls=unused", "train.num_steps=1",
                             *_model_overrides("gan", channels)])
    phases = build_phases(cfg, DataMeta(sample_shape=(1, size, size), data_kind="spins", boundary="periodic"))
    x = torch.randint(0, 2, (batch, 1, size, size)).float().mul_(2).sub_(1)
    with FlopCounterMode(display=False) as counter:
        for ph in phases:
            ph.module({"x": x}, StepContext(0, 0, 1, 0, 1)).loss.backward()
    return float(counter.get_total_flops())


def bench(args) -> dict[str, Any]:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict[str, dict] = {}
    for name in args.backends:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        r = results[name] = _launch(args, name, out)
        print(f"{name}: model state {r['model_state_total_mb']:.1f} MB/rank "
              f"({', '.join(f'{k} {v:.1f}' for k, v in r['model_state_mb'].items())}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, step {r['step_time_s']:.3f} s, save {r['save_s']:.2f} s, "
              f"load {r['load_s']:.2f} s" + (f", async: blocks {r['async']['stage_s']:.2f} s + steps slowed "
                                             f"{r['async']['slowdown_s']:.2f} s over {r['async']['steps_in_flight']} "
                                             f"step(s), written in {r['async']['write_s']:.2f} s"
                                             if "async" in r else ""), flush=True)
    first = next(iter(results.values()))
    if args.objective == "gan":
        flops = gan_step_flops(args.channels, args.size, args.batch_per_rank)
    else:
        flops = step_flops(args.channels, args.size, args.batch_per_rank)
    summary: dict[str, Any] = {
        "objective": args.objective, "preset": args.preset, "params": first["params"],
        "params_per_phase": first["params_per_phase"], "channels": args.channels, "size": args.size,
        "batch_per_rank": args.batch_per_rank, "num_processes": args.num_processes, "device": args.device,
        "mixed_precision": args.mixed_precision, "step_flops_per_rank": flops,
        "checkpoint_share": {k: r["checkpoint_share"] for k, r in results.items()},
        "mfu": {k: flops / r["step_time_s"] / (args.peak_tflops * 1e12) for k, r in results.items()},
        "backends": results,
    }
    ddp = results.get("ddp")
    for name, key in (("zero3", "mem_ratio_zero3_vs_ddp"), ("fsdp", "mem_ratio_fsdp_vs_ddp")):
        if ddp and name in results and args.num_processes > 1:
            summary[key] = results[name]["model_state_total_mb"] / ddp["model_state_total_mb"]
    if ddp and "fsdp" in results:
        summary["step_time_ratio_fsdp_vs_ddp"] = results["fsdp"]["step_time_s"] / ddp["step_time_s"]
    if ddp and "ddp_ac" in results:
        summary["activation_checkpointing_rss_ratio"] = results["ddp_ac"]["peak_rss_mb"] / ddp["peak_rss_mb"]
    return summary




def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("scale", help="memory per rank, step and checkpoint time per backend at 10M/100M",
                                    description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", choices=list(PRESETS), default="vdm",
                   help="vdm: a UNet of the preset's size; gan: G and D each of about that size (default vdm)")
    p.add_argument("--preset", choices=list(PRESETS["vdm"]), default="10m",
                   help="model size: tiny (0.1M VDM / a few k GAN, 16x16), 10m, 100m (64x64); default 10m")
    p.add_argument("--backends", type=backend_list(BACKENDS), default=None,
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default: all; for the GAN all but "
                        f"{', '.join(VDM_ONLY_BACKENDS)})")
    p.add_argument("--num-steps", type=positive_int, default=3, help="optimizer steps per backend (>= 2; default 3)")
    p.add_argument("--batch-per-rank", type=positive_int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: 2 gloo processes; cuda: 1 process on the GPU (default cpu)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default=None,
                   help="engine.mixed_precision (default: no on cpu, bf16 on cuda)")
    p.add_argument("--threads", type=positive_int, default=1, help="OMP threads per process (default 1)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="peak FLOP rate for the MFU figure, in TFLOP/s (default 790: H200 bf16 dense)")
    p.add_argument("--deepspeed-config",
                   help="engine.deepspeed_config (a DeepSpeed JSON) for the ZeRO backends, e.g. ZeRO-3's "
                        "stage3_max_reuse_distance (default: none, DeepSpeed's defaults)")
    p.add_argument("--work-dir", help="keep logs and checkpoints here (default: a temp dir)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import torch

    if args.num_steps < 2:
        raise ValueError(f"--num-steps must be >= 2 (the first step is start-up and not timed), got {args.num_steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    if args.backends is None:
        args.backends = [b for b in BACKENDS if args.objective == "vdm" or b not in VDM_ONLY_BACKENDS]
    elif args.objective == "gan" and set(args.backends) & set(VDM_ONLY_BACKENDS):
        raise ValueError(f"--backends {','.join(VDM_ONLY_BACKENDS)}: activation checkpointing is the VDM UNet's "
                         f"(vdm.activation_checkpointing); the GAN's networks have none")
    preset = PRESETS[args.objective][args.preset]
    args.channels, args.size = preset["channels"], preset["size"]
    args.num_processes = 1 if args.device == "cuda" else 2
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    if args.device == "cuda":
        # One GPU, one process: offload and ZeRO-1/2 vs 3 differ only in what 2+ ranks share.
        args.backends = [b for b in args.backends if b != "zero3_offload"]
    out = bench(args)
    for key, value in out["checkpoint_share"].items():
        if not math.isfinite(value):
            raise RuntimeError(f"checkpoint_share of {key} is not finite ({value})")
    print(json.dumps(out))
    return 0
