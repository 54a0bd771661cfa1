"""Exponential moving average of a module's weights: the weights we sample from and export."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


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
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        src = dict(module.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - d)
        src_b = dict(module.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
