"""GAN objectives (stub: the GAN owner fills this in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GANConfig:
    loss: Literal["minimax", "non-saturating", "wgan-gp", "hinge"] = "non-saturating"
    latent_dim: int = 64
    latent_prior: Literal["uniform", "normal"] = "uniform"
    n_critic: int = 1
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    gp_weight: float = 10.0
    conditional: bool = False
    channels: list[int] = field(default_factory=lambda: [64, 128])

    def validate(self) -> None:
        from pipeline.config import ConfigError

        if self.n_critic < 1:
            raise ConfigError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        if self.latent_dim <= 0:
            raise ConfigError(f"gan.latent_dim must be positive, got {self.latent_dim}")
