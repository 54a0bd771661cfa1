"""Exponential moving average of a module's weights: the weights we sample from and export.

Works on sharded modules too: the EMA reads a prepared phase's full weights through the engine
seam (``PreparedPhase.plain_copy`` / ``full_state``), which gathers them on every rank where
the backend shards parameters (the gather is a collective, and every rank then holds the same
EMA).
"""

from __future__ import annotations

import torch

from pipeline.train.engines.base import PreparedPhase


class EMA:
    """A frozen copy of ``phase.module`` tracking ``decay``-averaged parameters.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates
    (as in many diffusion codebases) so early, badly-trained weights are forgotten fast.
    Buffers (e.g. a time-step sampler's loss history) are copied, not averaged.

    The average is kept in float32 whatever the training weights' dtype: a backend that
    stores bf16/fp16 weights (DeepSpeed's bf16 mode) would otherwise give a bf16 average, whose
    increments (1 - decay) x (w - ema) fall below half a bf16 ulp at decay 0.999, so it would
    hardly move. The copy then samples and exports in float32.
    """

    def __init__(self, phase: PreparedPhase, decay: float):
        assert 0.0 <= decay < 1.0
        self.decay = decay
        self.num_updates = 0
        self.module = phase.plain_copy()
        for p in self.module.parameters():  # parameters only: buffers keep their dtype (e.g. float64 statistics)
            if p.is_floating_point():
                p.data = p.data.float()

    @torch.no_grad()
    def update(self, phase: PreparedPhase) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with phase.full_state() as src:
            for name, p in self.module.named_parameters():
                p.lerp_(src[name].to(p.dtype), 1.0 - d)
            for name, b in self.module.named_buffers():
                b.copy_(src[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
