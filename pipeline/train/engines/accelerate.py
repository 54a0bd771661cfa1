"""Accelerate behind the engine seam: one process, or DDP over several (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.engines.base import Engine, PreparedPhase
from pipeline.train.phases import Phase
from pipeline.train.schedule import lr_lambda


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _AcceleratePhase(PreparedPhase):
    """One phase under Accelerate: ``wrapped`` is what forward calls (DDP's wrapper over
    ``module`` on several processes, ``module`` itself on one)."""

    def __init__(self, phase: Phase, train: TrainConfig, accelerator, any_rank):
        super().__init__(phase)
        self.acc = accelerator
        self.any_rank = any_rank
        # Clipping is fixed when the phase is prepared, as DeepSpeed requires.
        self.max_norm = train.grad_clip_norm
        assert _trainable(phase.module), f"phase {phase.name!r} has no trainable parameters"
        self.wrapped, self.optimizer, base = self._wrap(phase, train)
        # Not passed through accelerator.prepare: Accelerate's scheduler wrapper advances the
        # schedule num_processes times per call (it assumes a sharded epoch-based loader), so
        # the LR would depend on the world size. Ours advances once per optimizer step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(base, lr_lambda(train))

    def _wrap(self, phase: Phase, train: TrainConfig):
        """(module to call, optimizer to step, the torch optimizer the LR schedule drives)."""
        opt = torch.optim.AdamW(_trainable(phase.module), lr=phase.lr, betas=phase.betas,
                                weight_decay=train.weight_decay)
        module, optimizer = self.acc.prepare(phase.module, opt)
        assert self.acc.unwrap_model(module) is phase.module
        return module, optimizer, optimizer.optimizer

    # ``module`` is the base class's ``phase.module``: prepare() moves it in place and DDP wraps
    # it (``wrapped``), so it is the unwrapped module (Accelerate's unwrap_model cost ~2 ms a
    # call, every step).

    def forward(self, batch, ctx):
        return self.wrapped(batch, ctx)

    def backward(self, loss):
        self.acc.backward(loss)

    def accumulating(self, is_last_micro_step: bool):
        if is_last_micro_step or self.acc.num_processes == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.wrapped)

    def step(self, local_ok):
        norm = self._clip(self.max_norm if self.max_norm is not None else float("inf"))
        skip = self.any_rank(not local_ok or not math.isfinite(norm))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the LR is a function of the step count, skipped or not
        return norm, skip

    def _clip(self, max_norm: float) -> float:
        """Clip the gradients to a global norm; return the norm before clipping."""
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, max_norm) if params else 0.0
        return float(torch.as_tensor(norm).detach().float().cpu())

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path, rank: int) -> None:
        # DDP: model and optimizer are replicated, rank 0 writes them.
        if rank == 0:
            torch.save(self.module.state_dict(), directory / f"model-{self.name}.pt")
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / f"optim-{self.name}.pt",
            )

    def load(self, directory: Path, rank: int) -> None:
        state = torch.load(directory / f"model-{self.name}.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state)
        opt = torch.load(directory / f"optim-{self.name}.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


class AccelerateEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        self.cfg = cfg
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
        super().close()  # first: Accelerate's end_training destroys the process group too
        self.acc.end_training()
