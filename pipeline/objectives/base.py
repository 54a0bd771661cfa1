"""The contract between objectives and the training loop.

An objective is an ``nn.Module`` whose ``forward(batch, ctx)`` returns an output with a
scalar ``loss`` to back-propagate and ``metrics()`` (floats to log). It knows nothing of
processes or backends: the loop hands it a :class:`StepContext` with the few integers that
cross-rank schemes (stratified time steps) need, and an ``all_gather`` callable when it has
state that must agree across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

AllGather = Callable[[torch.Tensor], torch.Tensor]  # concatenates a tensor over ranks along dim 0


@dataclass(frozen=True)
class StepContext:
    step: int  # 0-based index of the optimizer step being computed
    micro_step: int  # index within gradient accumulation, 0 .. grad_accum_steps - 1
    grad_accum_steps: int
    rank: int
    world_size: int


class ObjectiveOutput(Protocol):
    loss: torch.Tensor  # scalar, what is back-propagated

    def metrics(self) -> dict[str, float]: ...
