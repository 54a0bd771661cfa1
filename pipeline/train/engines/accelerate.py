"""Accelerate behind the engine seam: one process, or DDP over several (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.engines.base import Engine, PreparedPhase
from pipeline.train.phases import Phase
from pipeline.train.schedule import lr_lambda

# DCP warns on every save and load without a process group even when told no_dist=True; on one
# process that is our choice (``_one_process``), not news. Filtered here for its background
# thread, and around each call (``_quiet``) for code that resets the filters (tests).
_NO_DIST_WARNING = "torch.distributed is (disabled, )?unavailable or uninitialized, assuming"
warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        yield


def _one_process() -> bool:
    """No process group (Accelerate on one process): DCP reads and writes without collectives."""
    return not (dist.is_available() and dist.is_initialized())


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _AcceleratePhase(PreparedPhase):
    """One phase under Accelerate: ``wrapped`` is what forward calls (DDP's wrapper over
    ``module`` on several processes, ``module`` itself on one)."""

    def __init__(self, phase: Phase, train: TrainConfig, engine: AccelerateEngine):
        super().__init__(phase)
        self.acc = engine.acc
        self.any_rank = engine.any_rank
        # train.async_checkpoint: DCP's background write runs collectives (planning, metadata)
        # from its own thread, so it gets a gloo group of its own, never the one the training
        # steps use (two threads on one group would interleave their collectives).
        self.checkpoint_group = engine.checkpoint_group() if train.async_checkpoint else None
        # Clipping is fixed when the phase is prepared, as DeepSpeed requires.
        self.max_norm = train.grad_clip_norm
        assert _trainable(phase.module), f"phase {phase.name!r} has no trainable parameters"
        self.wrapped, self.optimizer, base = self._wrap(phase, train)
        self.torch_optimizer = base  # the optimizer itself, under Accelerate's wrapper
        # Not passed through accelerator.prepare: Accelerate's scheduler wrapper advances the
        # schedule num_processes times per call (it assumes a sharded epoch-based loader), so
        # the LR would depend on the world size. Ours advances once per optimizer step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(base, lr_lambda(train, phase.repeats))

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

    # Checkpoints: torch.distributed.checkpoint in ``<dir>/<prefix>-<phase>/``. Under DDP the
    # model and Adam state are replicated; DCP's planner writes each tensor once, spread over
    # the ranks (``__<rank>_0.distcp``), rank 0 the metadata. The state dicts are keyed by
    # parameter name, so they load onto any world size.
    DCP_PREFIX = "ddp"

    def _dcp_dir(self, directory: Path) -> Path:
        return Path(directory) / f"{self.DCP_PREFIX}-{self.name}"

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.wrapped, self.torch_optimizer)
        return {"model": model, "optim": optim}

    def _save_scheduler(self, directory: Path, rank: int) -> None:
        if rank == 0:  # a few numbers, the same on every rank
            self._dcp_dir(directory).mkdir(exist_ok=True)  # DCP's thread may not have made it yet
            torch.save(self.scheduler.state_dict(), self._dcp_dir(directory) / "scheduler.pt")

    def save(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp

        with _quiet():
            dcp.save(self._dcp_state(), checkpoint_id=self._dcp_dir(directory), no_dist=_one_process())
        self._save_scheduler(directory, rank)

    def save_async(self, directory: Path, rank: int) -> Future:
        import torch.distributed.checkpoint as dcp

        # Staged here (DCP's stager copies every tensor to fresh CPU memory before returning),
        # written by DCP's thread: the next optimizer step may change the weights at once.
        future = dcp.async_save(self._dcp_state(), checkpoint_id=self._dcp_dir(directory),
                                process_group=self.checkpoint_group, no_dist=_one_process())
        self._save_scheduler(directory, rank)
        return future

    def load(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        legacy = Path(directory) / f"model-{self.name}.pt"
        if legacy.is_file():  # a DDP checkpoint written before DCP (torch.save by rank 0)
            self._load_torch_save(Path(directory))
            return
        # Loaded into this run's layout, whatever world size wrote it: DCP reads, for each
        # tensor of this rank's state dict (a shard under FSDP), the slices that cover it.
        state = self._dcp_state()
        with _quiet():
            dcp.load(state, checkpoint_id=self._dcp_dir(directory), no_dist=_one_process())
        set_state_dict(self.wrapped, self.torch_optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(
            torch.load(self._dcp_dir(directory) / "scheduler.pt", map_location="cpu", weights_only=True))

    def _load_torch_save(self, directory: Path) -> None:
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
        return _AcceleratePhase(phase, train, self)

    def checkpoint_group(self) -> dist.ProcessGroup | None:
        """A new gloo group for one phase's background checkpoint writes (None on one process:
        DCP then writes without collectives). Collective: every rank creates it, in order."""
        if _one_process():
            return None
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.timeout_s))

    def close(self) -> None:
        super().close()  # first: Accelerate's end_training destroys the process group too
        self.acc.end_training()
