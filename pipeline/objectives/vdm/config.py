"""The VDM's typed configuration (the ``vdm:`` section of a run config).

Torch-free and numpy-free on purpose: the config layer validates a run's settings without
importing the model. Every check that needs only the config lives in :meth:`VDMConfig.validate`;
checks against the data (the manifest's data kind) are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError


@dataclass
class VDMConfig:
    # T: number of latents x_1..x_T (Luo 2022 indexing; T - 1 diffusion terms). 0 = continuous time.
    num_timesteps: int = 50
    schedule: Literal["linear", "cosine", "learned"] = "linear"
    gamma_min: float = -13.3  # -log SNR of x_1 (Kingma et al. 2021 defaults)
    gamma_max: float = 5.0  # -log SNR of x_T
    learn_endpoints: bool = False  # only with schedule: learned
    diffusion_form: Literal["denoising_matching", "consistency"] = "denoising_matching"
    timestep_sampler: Literal["uniform", "stratified", "importance", "learned-schedule"] = "stratified"
    importance_history: int = 10  # losses kept per time bin
    importance_uniform_mix: float = 0.1  # fraction of uniform mixed into p_t
    importance_num_bins: int = 100  # time bins in continuous time (discrete: one per term)
    # Decoder: "auto" takes the data kind from the data's manifest; an explicit value must match it.
    data_kind: Literal["auto", "spins", "levels", "continuous"] = "auto"
    architecture: Literal["auto", "unet", "mlp"] = "auto"  # auto: unet for [C, H, W], mlp otherwise
    channels: int = 16  # UNet width at full resolution
    # Recompute each UNet residual block's activations in backward instead of keeping them
    # (memory for compute; gradients unchanged). UNet only.
    activation_checkpointing: bool = False
    emb_dim: int = 64  # conditioning embedding (noise level + label)
    mlp_hidden: int = 128
    mlp_layers: int = 3
    periodic: bool = True  # circular padding (periodic lattices)
    sample_steps: int | None = None  # default ancestral steps for continuous time (discrete: T - 1)

    def validate(self) -> None:
        T = self.num_timesteps
        if T != 0 and T < 2:
            raise ConfigError(f"vdm.num_timesteps must be 0 (continuous time) or >= 2, got {T}")
        if not self.gamma_min < self.gamma_max:
            raise ConfigError(f"vdm.gamma_min must be < vdm.gamma_max, got {self.gamma_min} and {self.gamma_max}")
        if self.learn_endpoints and self.schedule != "learned":
            raise ConfigError("vdm.learn_endpoints=true needs vdm.schedule=learned")
        if self.diffusion_form == "consistency" and T == 0:
            raise ConfigError(
                "vdm.diffusion_form=consistency exists only in discrete time (vdm.num_timesteps >= 2); "
                "use denoising_matching with num_timesteps=0"
            )
        if self.timestep_sampler == "learned-schedule" and T != 0:
            raise ConfigError(
                "vdm.timestep_sampler=learned-schedule needs continuous time (vdm.num_timesteps=0): only there is "
                "the ELBO invariant to the time map it learns"
            )
        if self.importance_history < 1 or self.importance_num_bins < 1:
            raise ConfigError("vdm.importance_history and vdm.importance_num_bins must be >= 1")
        if not 0.0 < self.importance_uniform_mix <= 1.0:
            raise ConfigError(f"vdm.importance_uniform_mix must be in (0, 1], got {self.importance_uniform_mix}")
        for name in ("channels", "emb_dim", "mlp_hidden", "mlp_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vdm.{name} must be positive, got {getattr(self, name)}")
        if self.activation_checkpointing and self.architecture == "mlp":
            raise ConfigError("vdm.activation_checkpointing=true applies to the UNet; vdm.architecture=mlp has no "
                              "blocks to checkpoint (use architecture unet or auto with 2D/3D fields)")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ConfigError(f"vdm.sample_steps must be >= 1 or null, got {self.sample_steps}")
