"""The one seam between the training loop and the distributed backend.

The loop sees an :class:`Engine` (rank, collectives, ``prepare``) and, per phase, a
:class:`PreparedPhase` (forward, backward, step, state). It never branches on the
backend: Accelerate (single process, DDP, FSDP) and DeepSpeed (ZeRO 1-3) each implement
these few methods.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import weakref
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, NoReturn

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

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Context in which ``raw``'s parameters are whole, for code that reads them outside
        forward (e.g. an objective's log report). Collective where the backend shards
        parameters: every rank enters it."""
        return contextlib.nullcontext()

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
        global _PROCESS_GROUP_CLOSED
        if dist.is_available() and dist.is_initialized():
            _PROCESS_GROUP_CLOSED = True
            dist.destroy_process_group()


_PROCESS_GROUP_CLOSED = False  # set once an engine has torn down a process group in this process


def exit_process(code: int) -> NoReturn:
    """Leave a process that ran collectives without interpreter finalisation, if it did.

    ``destroy_process_group`` drops torch's own references to the process groups, but FSDP's
    device mesh, DeepSpeed's communication groups and Accelerate's state keep others, so the
    C++ gloo objects are destroyed only during interpreter finalisation, where their threads
    abort the process ("terminate called without an active exception", SIGABRT) after all
    work is done: seen here on about 1 in 10 two-process runs (torch 2.13, gloo; the same
    mechanism as pytorch/pytorch#179291). By then every file the run writes is closed and
    fsynced (checkpoints, tracker), so the process ends with os._exit and its real exit code.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if not _PROCESS_GROUP_CLOSED:
        sys.exit(code)
    logging.shutdown()
    os._exit(code)


# ---------------------------------------------------------------------------------------
# Accelerate: single process, DDP; FSDP2 on Accelerate's process group


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _AcceleratePhase(PreparedPhase):
    def __init__(self, phase: Phase, train: TrainConfig, accelerator, any_rank):
        super().__init__(phase)
        self.acc = accelerator
        self.any_rank = any_rank
        assert _trainable(phase.module), f"phase {phase.name!r} has no trainable parameters"
        self.module, self.optimizer, base = self._wrap(phase, train)
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
        norm = self._clip(max_norm if max_norm is not None else float("inf"))
        skip = self.any_rank(not local_ok or not math.isfinite(norm))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the LR is a function of the step count, skipped or not
        return norm, skip

    def _clip(self, max_norm: float) -> float:
        """Clip the gradients to a global norm; return the norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, max_norm) if params else 0.0
        return float(torch.as_tensor(norm).detach().float().cpu())

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


class _FSDPPhase(_AcceleratePhase):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and Adam state
    sharded over the ranks. Everything else (LR schedule, collective NaN skip) is DDP's.

    Accelerate's own FSDP plugin is not used: Accelerate 1.15 never enables it without a
    GPU. ``fully_shard`` works on CPU (gloo) and GPU alike.

    * Sharding unit: the phase's whole module (one ``fully_shard`` on the root). Anything may
      then read its parameters inside its forward, e.g. the VDM's learned schedule, which is
      called through ``schedule.net`` and ``endpoints()``, not through its own forward; peak
      memory still holds one phase's full parameters during its forward and backward, the
      saving is in gradients and optimizer state at rest (/ world size).
    * Modules a phase runs through but does not own (``Phase.frozen``: a GAN's D in G's
      loss) belong to another phase's FSDP module: ``accumulating`` all-gathers them around
      each micro step (forward and backward), like DeepSpeed ZeRO-3's GatheredParameters.
      The loop enters it inside ``frozen()``: requires_grad is already off, so FSDP's
      unsharded copies do not require gradients either and none reach the other phase.
    * Initial weights: rank 0's, broadcast before sharding, as DDP does.
    * 0-dim parameters (FSDP2 cannot shard scalars; the learned noise schedule has some)
      stay replicated, as under DDP: ``_clip`` averages their gradients over the ranks.
    * Checkpoints: torch.distributed.checkpoint, one file per rank with its shards of model
      and optimizer, in ``<dir>/fsdp-<phase>/``; loading reshards onto any world size.
    """

    def __init__(self, phase: Phase, train: TrainConfig, engine: "AccelerateEngine"):
        self.owner = engine
        super().__init__(phase, train, engine.acc, engine.any_rank)

    def _wrap(self, phase: Phase, train: TrainConfig):
        from torch.distributed.fsdp import fully_shard

        module = phase.module.to(self.owner.device)  # fully_shard does not move ignored params
        if self.owner.world_size > 1:
            # Rank 0's initial weights everywhere, as DDP does (ranks seed their RNGs apart);
            # fully_shard itself keeps each rank's own values for its shard.
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t, src=0)
        self.replicated = [p for p in module.parameters() if p.dim() == 0]
        # full_shard frees the gathered parameters after forward (gathered again for backward);
        # shard_grad_op keeps them until the end of backward: less communication, more memory.
        # fp32 only: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) would be the way
        # to bf16 on GPUs, untested without one, so Config.validate refuses it.
        fully_shard(module, mesh=self.owner.mesh, reshard_after_forward=self.owner.cfg.fsdp == "full_shard",
                    ignored_params=set(self.replicated))
        self.owner.fsdp_modules.append(weakref.ref(module))
        # AdamW over the sharded parameters (DTensors), built after sharding; the replicated
        # ones in a group of their own (foreach kernels do not mix DTensors and tensors).
        trainable = _trainable(module)
        groups = [{"params": [p for p in trainable if p.dim() > 0]}, {"params": [p for p in trainable if p.dim() == 0]}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=phase.lr, betas=phase.betas,
                                weight_decay=train.weight_decay)
        return module, opt, opt

    def backward(self, loss):
        loss.backward()

    @contextlib.contextmanager
    def accumulating(self, is_last_micro_step: bool):
        # Inner micro steps accumulate unreduced gradients; the last one reduce-scatters the sum.
        self.module.set_requires_gradient_sync(is_last_micro_step)
        with self.owner.gathered(self.phase.frozen):
            yield

    def full_weights(self):
        return self.owner.gathered([self.module])

    def _clip(self, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        world = self.owner.world_size
        rep = [p.grad for p in self.replicated if p.grad is not None]
        if rep and world > 1:  # FSDP leaves the replicated (ignored) parameters' gradients to us
            flat = torch.stack([g.reshape(()) for g in rep])
            dist.all_reduce(flat)
            for g, v in zip(rep, flat / world):
                g.copy_(v)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        # The global norm: every element of a sharded gradient lives on exactly one rank, so the
        # squares of the local shards summed over ranks; the replicated ones once.
        sq = torch.zeros((), device=self.owner.device)
        for g in grads:
            if isinstance(g, DTensor):
                sq += g.to_local().float().pow(2).sum()
        if world > 1:
            dist.all_reduce(sq)
        for g in rep:
            sq += g.float().pow(2).sum()
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:  # False for a NaN norm: that step is skipped anyway
            for g in grads:
                g.mul_(coef)
        return norm

    def _dir(self, directory: Path) -> Path:
        return Path(directory) / f"fsdp-{self.name}"

    def save(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # Sharded state dicts (DTensors): each rank writes its own shards of the parameters
        # and Adam moments (__<rank>_0.distcp), rank 0 the metadata; replicated tensors once.
        model, optim = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model, "optim": optim}, checkpoint_id=self._dir(directory))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), self._dir(directory) / "scheduler.pt")

    def load(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        # Loaded into this run's sharding, which may come from another world size: DCP reads
        # the slices of the saved shards that each rank now owns.
        model, optim = get_state_dict(self.module, self.optimizer)
        state = {"model": model, "optim": optim}
        dcp.load(state, checkpoint_id=self._dir(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(
            torch.load(self._dir(directory) / "scheduler.pt", map_location="cpu", weights_only=True))


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
        if cfg.fsdp != "off":
            from torch.distributed.device_mesh import init_device_mesh

            if not dist.is_initialized():  # one process without a launcher: a world of one
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timedelta(seconds=cfg.timeout_s))
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
            self.fsdp_modules: list[weakref.ref] = []  # every phase's sharded module

    def prepare(self, phase: Phase, train: TrainConfig) -> PreparedPhase:
        if self.cfg.fsdp != "off":
            return _FSDPPhase(phase, train, self)
        return _AcceleratePhase(phase, train, self.acc, self.any_rank)

    @contextlib.contextmanager
    def gathered(self, modules: list[nn.Module]) -> Iterator[None]:
        """Full parameters of ``modules`` (parts of any phase's FSDP module) until exit.

        Unsharding is per FSDP module: the FSDP modules containing any of ``modules`` are
        all-gathered. Collective: every rank enters it with the same modules.
        """
        owners = []
        for ref in self.fsdp_modules:
            owner = ref()
            if owner is not None and owner not in owners:
                subs = set(owner.modules())
                if any(m in subs for m in modules):
                    owners.append(owner)
        for owner in owners:
            owner.unshard()
        try:
            yield
        finally:
            for owner in owners:
                owner.reshard()

    def close(self) -> None:
        super().close()  # first: Accelerate's end_training destroys the process group too
        self.acc.end_training()


def build_engine(cfg: EngineConfig) -> Engine:
    if cfg.backend == "accelerate":
        return AccelerateEngine(cfg)
    from pipeline.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg)

