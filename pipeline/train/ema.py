"""Exponential moving average of a module's weights: the weights we sample from and export.

Works on sharded modules too: under DeepSpeed ZeRO-3 (parameters partitioned, ``ds_id``) and
FSDP2 (parameters are ``DTensor`` shards) the full parameters are gathered for every update,
on every rank (the gather is a collective, and every rank then holds the same EMA).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Iterator

import torch
import torch.nn as nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``{name: full parameter}`` of a possibly sharded module, valid inside the context.

    Collective when the module is sharded: call it on every rank.
    """
    params = dict(module.named_parameters())
    zero3 = [p for p in params.values() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather, torch.no_grad():
        yield {n: (p.full_tensor() if _is_dtensor(p) else p).detach() for n, p in params.items()}


def plain_copy(module: nn.Module) -> nn.Module:
    """A frozen, unsharded, hook-free copy of ``module`` holding its full weights.

    A plain ``deepcopy`` of a ZeRO-3 or FSDP module would copy empty shards and the backend's
    hooks (which point at the original's partitions), so parameters and hook tables are
    substituted through deepcopy's memo instead of copied.
    """
    with full_parameters(module) as full:
        memo: dict[int, object] = {}
        for name, p in module.named_parameters():
            memo[id(p)] = nn.Parameter(full[name].clone(), requires_grad=False)
        for m in module.modules():
            for attr in _HOOK_DICTS:
                d = m.__dict__.get(attr)
                if d is not None:
                    memo[id(d)] = OrderedDict()
            for key, value in m.__dict__.items():  # FSDP2's composable state (process groups)
                if key.startswith("__composable_api"):
                    memo[id(value)] = {}
        # fully_shard swaps a module's class for an FSDP<Class> subclass whose __deepcopy__
        # refuses; copy as the original class (the copy is a plain module), then swap back.
        swapped = [(m, type(m)) for m in module.modules() if _unsharded_class(type(m)) is not type(m)]
        try:
            for m, cls in swapped:
                m.__class__ = _unsharded_class(cls)
            out = copy.deepcopy(module, memo)
        finally:
            for m, cls in swapped:
                m.__class__ = cls
    for m in out.modules():
        if type(m._parameters) is not OrderedDict and type(m._parameters) is not dict:
            m._parameters = OrderedDict(m._parameters)  # DeepSpeed's gathering dict
        for key in [k for k in m.__dict__ if k.startswith("ds_") or k.startswith("__composable_api")]:
            del m.__dict__[key]
    return out.eval().requires_grad_(False)


def _unsharded_class(cls: type) -> type:
    """The module's own class under FSDP2's FSDP<Class>(FSDPModule, Class) subclass."""
    if not any(c.__name__ == "FSDPModule" for c in cls.__mro__[1:]):
        return cls
    return next(c for c in cls.__mro__[1:] if c.__name__ != "FSDPModule" and not c.__name__.startswith("FSDP"))


class EMA:
    """A frozen copy of ``module`` tracking ``decay``-averaged parameters.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates
    (as in many diffusion codebases) so early, badly-trained weights are forgotten fast.
    Buffers (e.g. a time-step sampler's loss history) are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        assert 0.0 <= decay < 1.0
        self.decay = decay
        self.num_updates = 0
        self.module = plain_copy(module)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with full_parameters(module) as src:
            for name, p in self.module.named_parameters():
                p.lerp_(src[name].to(p.dtype), 1.0 - d)
        src_b = dict(module.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name].full_tensor() if _is_dtensor(src_b[name]) else src_b[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
