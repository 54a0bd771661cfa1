"""Variational Diffusion Model objective (stub: the VDM owner fills this in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class VDMConfig:
    num_timesteps: int = 50  # T of the discrete-time VDM
    schedule: Literal["linear"] = "linear"
    # Discrete decoder for +1/-1 spins; Gaussian decoder for continuous data.
    data_kind: Literal["spins", "continuous"] = "spins"
    channels: int = 32  # width of the denoiser

    def validate(self) -> None:
        from pipeline.config import ConfigError

        if self.num_timesteps < 2:
            raise ConfigError(f"vdm.num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.channels <= 0:
            raise ConfigError(f"vdm.channels must be positive, got {self.channels}")
