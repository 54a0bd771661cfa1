"""The one seam between the training loop and the distributed backend.

The loop sees an :class:`Engine` (rank, collectives, ``prepare``) and, per phase, a
:class:`PreparedPhase` (forward, backward, step, state). It never branches on the
backend: Accelerate (single process, DDP), FSDP2 and DeepSpeed (ZeRO 1-3) each implement
these few methods.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import TrainConfig
from pipeline.train.engines.process_exit import mark_process_group_closed
from pipeline.objectives.base import Objective
from pipeline.train.phases import Phase

# A module's hook tables: emptied in a plain copy (a backend's hooks point at the original's
# partitions).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class PreparedPhase(ABC):
    """A phase whose module and optimizer the backend has wrapped."""

    def __init__(self, phase: Phase):
        self.phase = phase

    @property
    def name(self) -> str:
        return self.phase.name

    @property
    def module(self) -> Objective:
        """The unwrapped objective (for EMA, sampling, the contract's hooks)."""
        return self.phase.module

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], ctx: Any) -> Any: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def accumulating(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Context for one micro step: no gradient sync unless it is the last one."""

    @abstractmethod
    def step(self, local_ok: bool) -> tuple[float, bool]:
        """Clip (to ``train.grad_clip_norm`` of the TrainConfig the phase was prepared with)
        and apply the accumulated gradients, or skip them on every rank.

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

    def save_async(self, directory: Path, rank: int) -> Future:
        """Stage this rank's share (copy it, so training may go on) and write it into
        ``directory`` in the background; the future is done once this rank's write is
        (``train.async_checkpoint``; ``Config.validate`` allows it only where a backend has this)."""
        raise AssertionError(f"{type(self).__name__} has no asynchronous save; Config.validate refuses "
                             "train.async_checkpoint for its backend")

    @abstractmethod
    def load(self, directory: Path, rank: int) -> None: ...

    def model_state_bytes(self) -> dict[str, int]:
        """{"params", "grads", "optimizer"}: bytes of this rank's own tensors (``engines/memory.py``).
        Call it after a backward, before ``step``, for the gradients to be there."""
        from pipeline.train.engines.memory import StateCounter, optimizer_state_tensors

        counter = StateCounter()
        params = list(self.module.parameters())
        counter.add("params", params)
        counter.add("optimizer", optimizer_state_tensors(self.optimizer))
        counter.add("grads", [p.grad for p in params])
        return counter.bytes

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Context in which ``module``'s parameters are whole, for code that reads them outside
        forward (e.g. an objective's log report, the EMA). Collective where the backend shards
        parameters: every rank enters it."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_state(self) -> Iterator[dict[str, torch.Tensor]]:
        """``{name: full tensor}`` of ``module``'s parameters and buffers, detached, valid inside
        the context (the storage may be a backend's gather buffer). Collective like
        :meth:`full_weights`."""
        with self.full_weights(), torch.no_grad():
            yield {n: t.detach() for n, t in [*self.module.named_parameters(), *self.module.named_buffers()]}

    def plain_copy(self) -> nn.Module:
        """A frozen, unsharded, hook-free copy of ``module`` holding its full weights.

        A plain ``deepcopy`` of a ZeRO-3 or FSDP module would copy empty shards and the backend's
        hooks (which point at the original's partitions), so parameters and hook tables are
        substituted through deepcopy's memo instead of copied. Collective like
        :meth:`full_weights`.
        """
        with self.full_state() as full:
            memo: dict[int, object] = {}
            for name, p in self.module.named_parameters():
                memo[id(p)] = nn.Parameter(full[name].clone(), requires_grad=False)
            for m in self.module.modules():
                for attr in _HOOK_DICTS:
                    d = m.__dict__.get(attr)
                    if d is not None:
                        memo[id(d)] = OrderedDict()
            out = self._deepcopy(memo)
        for m in out.modules():
            # engine.compile: the copied compiled forward is the original's (a function closing
            # over the original module); the copy runs eagerly.
            m._compiled_call_impl = None
        return out.eval().requires_grad_(False)

    def _deepcopy(self, memo: dict[int, object]) -> nn.Module:
        """``deepcopy(module, memo)``; backends that leave their own state on the module (class
        swaps, attributes) override this to copy it as a plain module."""
        return copy.deepcopy(self.module, memo)

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
            mark_process_group_closed()  # see process_exit.exit_process
            dist.destroy_process_group()
