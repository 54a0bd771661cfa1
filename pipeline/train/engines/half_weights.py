"""Inputs cast to the dtype of the weights they meet, for backends whose weights themselves
are bf16/fp16 (DeepSpeed's ``bf16``/``fp16`` modes convert the module's parameters; Accelerate
and FSDP2 keep fp32 weights and cast per op under autocast instead).

Objectives and networks hand each other float32 tensors whatever the backend; a forward
pre-hook on every module that owns floating-point parameters casts its floating-point tensor
arguments to their dtype, at the boundary where autocast would cast them. Integer inputs (class
labels) pass unchanged, and a continuous label is standardised in float32 before the first
layer of its embedding casts it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle


def _own_float_param(module: nn.Module) -> torch.Tensor | None:
    """A floating-point parameter ``module`` holds itself, or through a parametrization (spectral
    norm keeps a layer's weight in ``parametrizations.weight.original``); None if it has none."""
    own = [p for p in module._parameters.values() if p is not None and p.is_floating_point()]
    if parametrize.is_parametrized(module):
        own += [p for p in module.parametrizations.parameters() if p.is_floating_point()]
    return own[0] if own else None


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _cast_to_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    weight = _own_float_param(module)
    assert weight is not None, f"{type(module).__name__} was hooked but holds no floating-point parameter"
    return tuple(_cast(a, weight.dtype) for a in args), {k: _cast(v, weight.dtype) for k, v in kwargs.items()}


def cast_inputs_to_weights(module: nn.Module) -> list[RemovableHandle]:
    """Register the cast on ``module`` and every submodule that owns floating-point parameters;
    returns the hooks' handles. The dtype is read at each call (the backend may convert the
    parameters after the hooks are registered)."""
    # A ParametrizationList holds the parametrized layer's weight but is never called with inputs.
    return [m.register_forward_pre_hook(_cast_to_weights, with_kwargs=True) for m in module.modules()
            if _own_float_param(m) is not None and not isinstance(m, parametrize.ParametrizationList)]
