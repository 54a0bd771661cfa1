"""A training phase: one module, its optimizer settings and how often it steps.

A VDM is one phase; a GAN is a discriminator phase and a generator phase (StyleGAN's
``phases`` pattern). The loop treats them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from pipeline.objectives.base import Objective


@dataclass
class Phase:
    name: str  # "vdm", "d", "g": prefixes its metrics and names its checkpoint files
    module: Objective  # the contract the loop uses: pipeline/objectives/base.py
    lr: float
    betas: tuple[float, float] = (0.9, 0.99)
    repeats: int = 1  # optimizer steps of this phase per loop step (e.g. n_critic for D)
    ema: bool = False  # keep an EMA of this module: the weights sampled from and exported
    # Modules whose parameters are frozen while this phase steps (D while G steps): their
    # gradients would be wasted work, and under DDP/ZeRO they must not be reduced.
    frozen: list[nn.Module] = field(default_factory=list)
