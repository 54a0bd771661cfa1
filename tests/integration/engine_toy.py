"""Toy objectives and a driver for the engine-backend integration tests.

Run under ``accelerate launch --multi_gpu --num_processes N`` (or plain python for 1 process):

    engine_toy.py --backend deepspeed --zero-stage 3 --ckpt DIR --out OUT.pt --mode first|resume
    engine_toy.py --backend accelerate --fsdp full_shard ...

``first``: train a toy regression and a toy GAN for a few steps (the loop's protocol: frozen
modules, grad accumulation, collective skip), save through the real Checkpointer, check that
a NaN loss on one rank only skips the step on every rank with parameters and optimizer state
bitwise unchanged, restart in-process and resume. ``resume``: restore the newest checkpoint
(possibly written at another world size), record what was restored, train two more steps and
save again. Rank 0 writes everything it measured to ``--out`` (torch.save of tensors and
flags); the pytest side compares runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import EngineConfig, TrainConfig
from pipeline.objectives.base import StepContext
from pipeline.train.checkpoint import Checkpointer
from pipeline.train.ema import EMA
from pipeline.train.engines import build_engine
from pipeline.train.engines.base import Engine, PreparedPhase
from pipeline.train.engines.process_exit import exit_process
from pipeline.train.phases import Phase
from pipeline.train.state import TrainState

GRAD_ACCUM = 2
BATCH_PER_RANK = 8
TRAIN = TrainConfig(num_steps=20, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, grad_accum_steps=GRAD_ACCUM,
                    grad_clip_norm=1.0, ema_decay=0.9)


@dataclass
class Out:
    loss: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach())}


class Regression(nn.Module):
    """MLP regression of y = sin(x0) + x1 x2; ``batch['poison']`` (0 or NaN) is added to the
    loss: a NaN loss with finite gradients, so only the loss check can catch it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, batch, ctx):
        pred = self.net(batch["x"]).squeeze(-1)
        return Out(F.mse_loss(pred, batch["y"]) + batch["poison"][0])


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class DStep(nn.Module):
    """Registers D only; G is referenced, unregistered, and run without gradient."""

    def __init__(self, d, g):
        super().__init__()
        self.d = d
        object.__setattr__(self, "_g", g)

    def forward(self, batch, ctx):
        with torch.no_grad():
            fake = self._g(batch["z"])
        # real and fake through D in one forward per backward (one reduction per step)
        logits = self.d(torch.cat([batch["real"], fake]))
        n = batch["real"].shape[0]
        return Out(F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean())


class GStep(nn.Module):
    """Registers G only; G's non-saturating loss back-propagates through the frozen D."""

    def __init__(self, g, d):
        super().__init__()
        self.g = g
        object.__setattr__(self, "_d", d)

    def forward(self, batch, ctx):
        return Out(F.softplus(-self._d(self.g(batch["z"]))).mean())


def build_phases(seed: int) -> list[Phase]:
    torch.manual_seed(seed)  # same on every rank: replicas start identical
    g, d = Generator(), Discriminator()
    return [
        Phase("reg", Regression(), lr=1e-2, ema=True),
        Phase("d", DStep(d, g), lr=5e-3, frozen=[g]),
        Phase("g", GStep(g, d), lr=5e-3, frozen=[d]),
    ]


def make_batch(name: str, step: int, micro: int, rank: int, poison: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank + {"reg": 1, "d": 2, "g": 3}[name])
    if name == "reg":
        x = torch.randn(BATCH_PER_RANK, 3, generator=gen)
        y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2]
        return {"x": x, "y": y, "poison": torch.tensor([float("nan") if poison else 0.0])}
    real = torch.randn(BATCH_PER_RANK, 2, generator=gen) * 0.5 + torch.tensor([2.0, -1.0])
    return {"real": real, "z": torch.randn(BATCH_PER_RANK, 2, generator=gen)}


def optimizer_step(ph: PreparedPhase, engine: Engine, step: int, poison_rank: int | None = None):
    """One optimizer step with the loop's protocol (pipeline/train/loop.py: optimizer_step)."""
    losses = []
    for micro in range(GRAD_ACCUM):
        batch = make_batch(ph.name, step, micro, engine.rank, poison=engine.rank == poison_rank)
        ctx = StepContext(step, micro, GRAD_ACCUM, engine.rank, engine.world_size)
        with ph.accumulating(is_last_micro_step=micro == GRAD_ACCUM - 1):
            out = ph.forward(batch, ctx)
            ph.backward(out.loss / GRAD_ACCUM)
        losses.append(out.loss.detach())
    ok = all(bool(torch.isfinite(x).all()) for x in losses)
    return ph.step(local_ok=ok)  # clips to TRAIN.grad_clip_norm, given at prepare


def full_params(ph: PreparedPhase) -> dict[str, torch.Tensor]:
    names = dict(ph.module.named_parameters())
    with ph.full_state() as full:
        return {k: v.clone() for k, v in full.items() if k in names}


def full_moments(ph: PreparedPhase) -> dict[str, torch.Tensor]:
    """Adam's exp_avg / exp_avg_sq per parameter name, full (unsharded), on every rank."""
    out = {}
    if hasattr(ph, "ds_engine"):  # DeepSpeed
        from deepspeed.utils import safe_get_full_optimizer_state

        from pipeline.train.engines.deepspeed_reshard import link_optimizer_state

        link_optimizer_state(ph.ds_engine.optimizer)
        for name, p in ph.ds_engine.module.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                v = safe_get_full_optimizer_state(p, key)
                if v is not None:
                    out[f"{name}.{key}"] = v.detach().clone().cpu()
        steps = [float(st["step"]) for st in ph.base_optimizer.state.values() if "step" in st]
        out["adam_step"] = torch.tensor(sorted(set(steps)))
        return out
    if hasattr(ph, "replicated"):  # FSDP: Adam state per (sharded DTensor) parameter, gathered
        from torch.distributed.tensor import DTensor

        steps = set()
        for name, p in ph.module.named_parameters():
            st = ph.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    v = st[key]
                    out[f"{name}.{key}"] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            if "step" in st:
                steps.add(float(st["step"]))
        out["adam_step"] = torch.tensor(sorted(steps))
        return out
    state = ph.optimizer.state_dict()["state"]
    names = [n for n, p in ph.module.named_parameters() if p.requires_grad]
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            if i in state and key in state[i]:
                out[f"{name}.{key}"] = state[i][key].detach().clone()
    out["adam_step"] = torch.tensor(sorted({float(st["step"]) for st in state.values() if "step" in st}))
    return out


def snapshot(phases: list[PreparedPhase], emas: dict[str, EMA]) -> dict:
    return {
        "params": {ph.name: full_params(ph) for ph in phases},
        "moments": {ph.name: full_moments(ph) for ph in phases},
        "lr": {ph.name: ph.lr() for ph in phases},
        "ema": {k: {n: p.detach().clone() for n, p in e.module.named_parameters()} for k, e in emas.items()},
    }


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_engine(args) -> Engine:
    ds_json = None
    if args.backend == "deepspeed":
        # Partition even tiny parameters under ZeRO-3, so gathering is really exercised: through
        # the user's route, a base DeepSpeed JSON (one per process, in the test's directory).
        ds_json = args.ckpt.parent / f"ds-toy-{os.getpid()}.json"
        ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = EngineConfig(backend=args.backend, fsdp=args.fsdp, zero_stage=args.zero_stage,
                       offload_optimizer=args.offload, timeout_s=120,
                       deepspeed_config=None if ds_json is None else str(ds_json))
    return build_engine(cfg)


def setup(engine: Engine, seed: int, ckpt: Path, async_checkpoint: bool = False):
    train = dataclasses.replace(TRAIN, async_checkpoint=async_checkpoint)
    phases = [engine.prepare(p, train) for p in build_phases(seed)]
    by_name = {ph.name: ph for ph in phases}
    emas = {"reg": EMA(by_name["reg"], TRAIN.ema_decay), "g": EMA(by_name["g"], TRAIN.ema_decay)}
    state = TrainState()
    ck = Checkpointer(ckpt, engine, keep_last=5, keep_every=None, config_hash="toy")
    return phases, emas, state, ck


def train_steps(engine, phases, emas, state, num_steps: int, report: dict) -> None:
    by_name = {ph.name: ph for ph in phases}
    for _ in range(num_steps):
        for ph in phases:
            others = [o for o in phases if o is not ph]
            before = {o.name: full_params(o) for o in others}
            with ph.frozen():
                norm, skipped = optimizer_step(ph, engine, state.step)
            assert not skipped, f"unexpected skip in {ph.name} at step {state.step}"
            # the phase trains only its own module: every other module is bitwise untouched
            for o in others:
                report["frozen_ok"] &= equal(before[o.name], full_params(o))
            report["norms"].append((ph.name, norm))
        for key, ema in emas.items():
            expected_d = min(ema.decay, (2 + ema.num_updates) / (11 + ema.num_updates))
            old = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
            ema.update(by_name[key])
            # independent reference: e <- d e + (1 - d) theta, with the full (gathered) theta
            cur = full_params(by_name[key])
            for n, p in ema.module.named_parameters():
                ref = old[n] * expected_d + cur[n] * (1 - expected_d)
                report["ema_ok"] &= bool(torch.allclose(p, ref, rtol=1e-6, atol=1e-7))
        state.step += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="accelerate", choices=["accelerate", "deepspeed"])
    ap.add_argument("--fsdp", default="off")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--mode", choices=["first", "resume"], required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--async-checkpoint", action="store_true",
                    help="save_async: the first run trains on while its checkpoint is written")
    args = ap.parse_args()

    t0 = time.perf_counter()
    engine = make_engine(args)
    shared = lambda emas, state: {"trainer": state, "ema_reg": emas["reg"], "ema_g": emas["g"]}  # noqa: E731
    report: dict = {"world_size": engine.world_size, "frozen_ok": True, "ema_ok": True, "norms": []}
    try:
        phases, emas, state, ck = setup(engine, seed=1, ckpt=args.ckpt, async_checkpoint=args.async_checkpoint)
        save = ck.save_async if args.async_checkpoint else ck.save
        if args.mode == "first":
            train_steps(engine, phases, emas, state, 3, report)
            save(state.step, phases, shared(emas, state), {})
            report["saved"] = snapshot(phases, emas)
            report["saved_step"] = state.step

            # NaN loss on the last rank only: every rank must skip, nothing may change.
            reg = next(ph for ph in phases if ph.name == "reg")
            before = snapshot([reg], {})
            lr_before = reg.lr()
            norm, skipped = optimizer_step(reg, engine, 99, poison_rank=engine.world_size - 1)
            after = snapshot([reg], {})
            report["nan_skipped"] = skipped
            report["nan_skipped_all"] = engine.all_reduce_sum(torch.tensor([float(skipped)])).item()
            report["nan_params_equal"] = equal(before["params"]["reg"], after["params"]["reg"])
            report["nan_moments_equal"] = equal(before["moments"]["reg"], after["moments"]["reg"])
            report["nan_lr_advanced"] = reg.lr() != lr_before
            # the next good step applies, and only its own gradients (the skipped ones are gone)
            norm2, skipped2 = optimizer_step(reg, engine, 100)
            report["after_nan_skipped"] = skipped2
            report["after_nan_changed"] = not equal(after["params"]["reg"], full_params(reg))
            ck.finalize()  # async: committed only now, after the steps above changed the weights
            del phases, emas, reg

            # restart in-process: fresh weights (another seed), then restore
            phases, emas, state, ck = setup(engine, seed=2, ckpt=args.ckpt)
            report["fresh_differs"] = not equal(full_params(phases[0]), report["saved"]["params"]["reg"])
            manifest = ck.restore(phases, shared(emas, state), {})
            report["restored_step"] = state.step
            report["restored"] = snapshot(phases, emas)
        else:
            manifest = ck.restore(phases, shared(emas, state), {})
            report["restored_from_world_size"] = manifest["world_size"]
            report["restored_step"] = state.step
            report["restored"] = snapshot(phases, emas)
            train_steps(engine, phases, emas, state, 2, report)
            save(state.step, phases, shared(emas, state), {})
            report["saved"] = snapshot(phases, emas)
            report["saved_step"] = state.step
            ck.finalize()
        report["seconds"] = time.perf_counter() - t0
        if engine.is_main:
            torch.save(report, args.out)
        engine.barrier()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
    exit_process(0)  # as `pipeline train` does: no interpreter finalisation after collectives
