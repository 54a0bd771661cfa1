"""Model-state memory a rank holds, counted from its tensors (issue 18, section 1).

Parameters, gradients and optimizer state (Adam moments, and the fp32 master copies ZeRO and
mixed precision keep), each tensor counted by what this rank stores of it (a DTensor's
``to_local()``; a ZeRO-3 parameter's ``ds_tensor`` partition, plus its full tensor while gathered,
as the small ones always are) and each storage once, however many views point into it
(ZeRO's flat buffers). What autograd keeps for backward and a backend's private C++ buffers
(DDP's gradient buckets) are not reachable from Python and not counted: peak RSS covers them.
"""

from __future__ import annotations

from typing import Iterable

import torch

CATEGORIES = ("params", "grads", "optimizer")


def local(t: torch.Tensor) -> list[torch.Tensor]:
    """The parts of ``t`` this rank stores: a DTensor's shard; a ZeRO-3 parameter's partition
    (``ds_tensor``) and, while it is gathered, its full tensor (``data``: empty once released).
    ZeRO-3 never releases parameters of at most ``stage3_param_persistence_threshold`` elements
    (DeepSpeed's default 1e5): they stay whole on every rank beside their partition."""
    if hasattr(t, "ds_tensor"):  # ZeRO-3 parameter
        return [t.ds_tensor, t.data]
    return [t.to_local() if hasattr(t, "to_local") else t]


class StateCounter:
    """Bytes per category; a storage counted once, in the first category that claims it."""

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self._seen: set[int] = set()

    def add(self, category: str, tensors: Iterable[torch.Tensor]) -> None:
        assert category in self.bytes, category
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            for part in local(t):  # a released ZeRO-3 parameter has numel() 0 but holds its partition
                if part is None or part.numel() == 0:
                    continue
                storage = part.untyped_storage()
                if storage.data_ptr() in self._seen:
                    continue
                self._seen.add(storage.data_ptr())
                self.bytes[category] += storage.nbytes()


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]


def tensors_in(value, depth: int = 3) -> list[torch.Tensor]:
    """Tensors in ``value`` and in its lists, tuples and dicts, ``depth`` levels down."""
    if torch.is_tensor(value):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v, depth - 1)]
    return []
