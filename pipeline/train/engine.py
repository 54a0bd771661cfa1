"""The one seam between the training loop and the distributed backend.

The loop sees an :class:`Engine` (rank, collectives, ``prepare``) and, per phase, a
:class:`PreparedPhase` (forward, backward, step, state). It never branches on the
backend: Accelerate (single process, DDP, FSDP) and DeepSpeed (ZeRO 1-3) each implement
these few methods.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.phases import Phase


def lr_lambda(train: TrainConfig):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""

    def f(step: int) -> float:
        if train.warmup_steps > 0 and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.min_lr_ratio >= 1.0:
            return 1.0
        span = max(1, train.num_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class PreparedPhase(ABC):
    """A phase whose module and optimizer the backend has wrapped."""

    def __init__(self, phase: Phase):
        self.phase = phase

    @property
    def name(self) -> str:
        return self.phase.name

    @property
    def raw(self) -> nn.Module:
        """The unwrapped module (for EMA, sampling, hooks)."""
        return self.phase.module

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], ctx: Any) -> Any: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def accumulating(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Context for one micro step: no gradient sync unless it is the last one."""

    @abstractmethod
    def step(self, local_ok: bool, max_norm: float | None) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients, or skip them on every rank.

        ``local_ok`` is false when this rank saw a NaN/Inf loss. The decision to skip is
        collective (any rank's bad loss or a non-finite global gradient norm skips the step
        everywhere), so ranks never diverge. The LR schedule advances either way. Returns
        (global gradient norm before clipping, skipped).
        """

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save(self, directory: Path, rank: int) -> None:
        """Write this phase's model and optimizer state (this rank's share) into ``directory``."""

    @abstractmethod
    def load(self, directory: Path, rank: int) -> None: ...

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze the modules this phase must not train (D while G steps)."""
        saved = [(p, p.requires_grad) for m in self.phase.frozen for p in m.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)


class Engine(ABC):
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def prepare(self, phase: Phase, train: TrainConfig) -> PreparedPhase: ...

    # Collectives, shared by every backend: both initialise torch.distributed.
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` (same shape on every rank) over ranks along dim 0."""
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank: decisions taken together."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(t).item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a small, picklable value we created ourselves)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Accelerate: single process, DDP, FSDP


class _AcceleratePhase(PreparedPhase):
    def __init__(self, phase: Phase, train: TrainConfig, accelerator, any_rank):
        super().__init__(phase)
        self.acc = accelerator
        self.any_rank = any_rank
        params = [p for p in phase.module.parameters() if p.requires_grad]
        assert params, f"phase {phase.name!r} has no trainable parameters"
        opt = torch.optim.AdamW(params, lr=phase.lr, betas=phase.betas, weight_decay=train.weight_decay)
        self.module, self.optimizer = accelerator.prepare(phase.module, opt)
        assert accelerator.unwrap_model(self.module) is phase.module
        # Not passed through accelerator.prepare: Accelerate's scheduler wrapper advances the
        # schedule num_processes times per call (it assumes a sharded epoch-based loader), so
        # the LR would depend on the world size. Ours advances once per optimizer step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, lr_lambda(train))

    # ``raw`` is the base class's ``phase.module``: prepare() moves it in place and DDP wraps it,
    # so it is the unwrapped module (Accelerate's unwrap_model cost ~2 ms a call, every step).

    def forward(self, batch, ctx):
        return self.module(batch, ctx)

    def backward(self, loss):
        self.acc.backward(loss)

    def accumulating(self, is_last_micro_step: bool):
        if is_last_micro_step or self.acc.num_processes == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.module)

    def step(self, local_ok, max_norm):
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf")) if params else 0.0
        norm = float(torch.as_tensor(norm).detach().float().cpu())
        skip = self.any_rank(not local_ok or not math.isfinite(norm))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the LR is a function of the step count, skipped or not
        return norm, skip

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path, rank: int) -> None:
        # DDP: model and optimizer are replicated, rank 0 writes them.
        if rank == 0:
            torch.save(self.raw.state_dict(), directory / f"model-{self.name}.pt")
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / f"optim-{self.name}.pt",
            )

    def load(self, directory: Path, rank: int) -> None:
        state = torch.load(directory / f"model-{self.name}.pt", map_location="cpu", weights_only=True)
        self.raw.load_state_dict(state)
        opt = torch.load(directory / f"optim-{self.name}.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


class AccelerateEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        assert cfg.fsdp == "off", "rejected by Config.validate before any process group starts"
        self.acc = Accelerator(
            # Without CUDA, Accelerate only sets up a process group (gloo, MULTI_CPU) when told
            # cpu=True; otherwise every process of a multi-process launch trains alone.
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))],
        )
        self.rank = self.acc.process_index
        self.world_size = self.acc.num_processes
        self.local_rank = self.acc.local_process_index
        self.device = self.acc.device

    def prepare(self, phase: Phase, train: TrainConfig) -> PreparedPhase:
        return _AcceleratePhase(phase, train, self.acc, self.any_rank)

    def close(self) -> None:
        self.acc.end_training()
        super().close()


def build_engine(cfg: EngineConfig) -> Engine:
    if cfg.backend == "accelerate":
        return AccelerateEngine(cfg)
    from pipeline.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg)

