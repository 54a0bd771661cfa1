"""The VDM's typed configuration (the ``vdm:`` section of a run config).

Torch-free and numpy-free on purpose: the config layer validates a run's settings without
importing the model. Every check that needs only the config lives in :meth:`VDMConfig.validate`,
every check against the data's manifest in :meth:`VDMConfig.check_data`: both run before any
process group starts or anything is written to the run directory (issue 15 item 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data.meta import DataMeta


@dataclass
class VDMConfig:
    # T: number of latents x_1..x_T (Luo 2022 indexing; T - 1 diffusion terms). 0 = continuous time.
    num_timesteps: int = 50
    schedule: Literal["linear", "cosine", "learned"] = "linear"
    gamma_min: float = -13.3  # -log SNR of x_1 (Kingma et al. 2021 defaults)
    gamma_max: float = 5.0  # -log SNR of x_T
    learn_endpoints: bool = False  # only with schedule: learned
    diffusion_form: Literal["denoising_matching", "consistency"] = "denoising_matching"
    # importance-cv: importance sampling around a per-bin baseline (a control variate from the
    # same loss history): a less noisy ELBO estimate, the same kind of gradient (timesteps.py).
    timestep_sampler: Literal["uniform", "stratified", "importance", "importance-cv",
                              "learned-schedule"] = "stratified"
    importance_history: int = 10  # losses kept per time bin
    importance_uniform_mix: float = 0.1  # fraction of uniform mixed into p_t
    importance_num_bins: int = 100  # time bins in continuous time (discrete: one per term)
    # Decoder: "auto" takes the data kind from the data's manifest; an explicit value must match it.
    data_kind: Literal["auto", "spins", "levels", "continuous"] = "auto"
    # Continuous data only: the invertible map into model space (objectives/data_space.py).
    # "log-label-fraction": each value divided by the sample's label (a shower's incident
    # energy), log-transformed onto [-1, 1]; data_transform_floor is the fraction of the label
    # the log resolves near 0. Samples come back in data space; the ELBO is of the stored values.
    data_transform: Literal["none", "log-label-fraction"] = "none"
    data_transform_floor: float = 1e-8
    architecture: Literal["auto", "unet", "mlp"] = "auto"  # auto: unet for [C, H, W], mlp otherwise
    channels: int = 16  # UNet width at full resolution
    # UNet down-sampling levels (2 * channels below the first): more reach the box's largest
    # wavelengths (models/unet.py); with periodic=true every spatial size must be a multiple of
    # 2^unet_levels (zero padding pads the samples up to one inside the network).
    unet_levels: int = 1
    # Recompute each UNet residual block's activations in backward instead of keeping them
    # (memory for compute; gradients unchanged). UNet only.
    activation_checkpointing: bool = False
    emb_dim: int = 64  # conditioning embedding (noise level + label)
    mlp_hidden: int = 128
    mlp_layers: int = 3
    # "gaussian": eps_hat = the exact denoiser of independent Gaussian values with the data's
    # running per-value mean and variance + the network's correction (denoiser.GaussianSkip).
    # Needed by an MLP narrower than the sample (mlp_hidden < its number of values; `pipeline
    # train` warns when such an MLP has no skip); helps data far from unit scale (phi^4 in the
    # broken phase, docs/model_zoo.md). "spectral": the same
    # for a stationary field on a periodic grid, with the data's mean and power spectrum per
    # channel (the Wiener filter, denoiser.SpectralSkip; data with boundary periodic only).
    # "sparse": the exact denoiser of independent values that are each empty (a stored 0) with
    # the data's running probability, else Gaussian with the non-empty values' moments
    # (denoiser.SparseSkip; continuous data, e.g. calorimeter voxels). "discrete": the exact
    # denoiser of independent values on the data's levels with their running probabilities per
    # value (denoiser.DiscreteSkip; spins and levels): exact at low noise, so a low gamma_min
    # costs nothing.
    skip: Literal["none", "gaussian", "spectral", "sparse", "discrete"] = "none"
    periodic: bool = True  # circular padding (periodic lattices)
    sample_steps: int | None = None  # default ancestral steps for continuous time (discrete: T - 1)
    # Default grid of noise levels for sampling (``--grid`` overrides it): see SamplerConfig.
    sample_grid: str = "time"

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
        for name in ("channels", "unet_levels", "emb_dim", "mlp_hidden", "mlp_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vdm.{name} must be positive, got {getattr(self, name)}")
        if self.activation_checkpointing and self.architecture == "mlp":
            raise ConfigError("vdm.activation_checkpointing=true applies to the UNet; vdm.architecture=mlp has no "
                              "blocks to checkpoint (use architecture unet or auto with 2D/3D fields)")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ConfigError(f"vdm.sample_steps must be >= 1 or null, got {self.sample_steps}")
        if self.sample_grid not in GRID_SPACINGS:
            raise ConfigError(f"unknown vdm.sample_grid {self.sample_grid!r}; allowed: {', '.join(GRID_SPACINGS)}")
        if self.sample_grid != "time" and T != 0:
            raise ConfigError(f"vdm.sample_grid={self.sample_grid} needs continuous time (vdm.num_timesteps=0): a "
                              f"discrete-time model knows only the noise levels of its T latents; use time")
        if not 0.0 < self.data_transform_floor < 0.1:
            raise ConfigError(f"vdm.data_transform_floor must be in (0, 0.1) (a fraction of the label), "
                              f"got {self.data_transform_floor}")

    def resolve_architecture(self, sample_shape: tuple[int, ...]) -> str:
        """``unet`` or ``mlp`` for samples of this shape. ``auto`` takes the UNet for 2D and 3D
        fields with even sizes and the MLP otherwise: a [C, L] array may be a vector of
        features, so a 1D UNet is asked for by name, and so is a UNet over odd sizes (zero
        padding only: it pads them up inside, models/unet.py). ConfigError when a UNet is asked
        for samples it cannot take."""
        rank_ok = 2 <= len(sample_shape) <= 4
        fields = rank_ok and all(s % 2 == 0 for s in sample_shape[1:])
        if self.architecture == "unet" and not rank_ok:
            raise ConfigError(
                f"vdm.architecture=unet needs samples [C, L], [C, H, W] or [C, D, H, W]; got {tuple(sample_shape)} "
                f"(the data's sample shape); use vdm.architecture=mlp (or auto)")
        if self.architecture == "unet" and self.periodic and not fields:
            raise ConfigError(
                f"vdm.architecture=unet with vdm.periodic=true (circular padding) needs even spatial sizes; "
                f"got {tuple(sample_shape)} (the data's sample shape); set vdm.periodic=false (zero padding takes "
                f"any size) or use vdm.architecture=mlp (or auto)"
            )
        if self.architecture == "auto":
            chosen = "unet" if fields and len(sample_shape) >= 3 else "mlp"
        else:
            chosen = self.architecture
        step = 2**self.unet_levels
        if chosen == "unet" and self.periodic and any(s % step for s in sample_shape[1:]):
            fit = max(k for k in range(1, 16) if all(s % 2**k == 0 for s in sample_shape[1:]))
            raise ConfigError(
                f"vdm.unet_levels={self.unet_levels} with vdm.periodic=true needs every spatial size a multiple of "
                f"{step}; the data's samples are {tuple(sample_shape)}: use vdm.unet_levels <= {fit} "
                f"(or vdm.periodic=false: zero padding takes any size)")
        if chosen == "mlp" and self.unet_levels != 1:
            raise ConfigError(f"vdm.unet_levels={self.unet_levels} applies to the UNet; samples {tuple(sample_shape)} "
                              f"get the MLP (vdm.architecture={self.architecture}): leave vdm.unet_levels at 1")
        return chosen

    def inert_keys(self, meta: "DataMeta") -> dict[str, str]:
        """The keys of this section that do not act on the model built for data described by
        ``meta`` (the other architecture's settings; the importance sampler's when t is not
        importance-sampled, and its number of bins in discrete time), each with why: a resume
        does not compare them, and `pipeline train` names those set to other than their defaults."""
        arch = self.resolve_architecture(tuple(meta.sample_shape))
        keys = _UNET_ONLY_KEYS if arch == "mlp" else _MLP_ONLY_KEYS
        why = f"samples of shape {tuple(meta.sample_shape)} get the {arch} (vdm.architecture={self.architecture})"
        out = {f"vdm.{k}": why for k in keys}
        if self.timestep_sampler not in _IMPORTANCE_SAMPLERS:
            why = f"vdm.timestep_sampler={self.timestep_sampler!r} keeps no loss history (importance samplers do)"
            out.update({f"vdm.{k}": why for k in _IMPORTANCE_KEYS})
        elif self.num_timesteps != 0:
            out["vdm.importance_num_bins"] = ("in discrete time the importance sampler has one bin per diffusion "
                                              f"term (vdm.num_timesteps - 1 = {self.num_timesteps - 1})")
        return out

    def data_warnings(self, meta: "DataMeta") -> list[str]:
        """Settings that train on data described by ``meta`` but are known to go wrong, each
        named with its fix (`pipeline train` prints them before it starts)."""
        shape = tuple(meta.sample_shape)
        num_values = math.prod(shape)
        if self.resolve_architecture(shape) == "mlp" and self.skip == "none" and self.mlp_hidden < num_values:
            # At high noise the exact eps_hat is ~ z itself, which a network narrower than the
            # sample cannot pass through, and each ancestral step divides its error by alpha:
            # the calorimeter MLP's samples diverged so (docs/model_zoo.md, vdm_calo).
            return [f"vdm.mlp_hidden={self.mlp_hidden} is narrower than the samples' {num_values} values "
                    f"(shape {shape}) with vdm.skip=none: at high noise the denoiser must pass z through, which "
                    f"this MLP cannot, and sampling may diverge; set vdm.skip=gaussian (or vdm.mlp_hidden >= "
                    f"{num_values})"]
        return []

    def reads_labels(self, meta: "DataMeta") -> bool:
        """Whether training reads each sample's label: a VDM conditions on the data's labels
        whenever its manifest has them (``meta.label_kind``)."""
        return meta.label_kind != "none"

    def check_data(self, meta: "DataMeta") -> None:
        """ConfigError when this config cannot be trained on data described by ``meta``."""
        if self.data_kind != "auto" and self.data_kind != meta.data_kind:
            raise ConfigError(f"vdm.data_kind={self.data_kind!r} but the data's manifest says {meta.data_kind!r}; "
                              f"set vdm.data_kind=auto or {meta.data_kind!r}")
        if meta.data_kind == "levels" and (not meta.num_levels or meta.num_levels < 2):
            raise ConfigError(f"data_kind 'levels' needs num_levels >= 2 in the data's manifest, got {meta.num_levels}")
        if meta.label_kind == "class" and (not meta.num_classes or meta.num_classes < 1):
            raise ConfigError(f"label_kind 'class' needs num_classes >= 1 in the data's manifest, got {meta.num_classes}")
        self.resolve_architecture(tuple(meta.sample_shape))
        if self.skip == "spectral" and (meta.boundary != "periodic" or len(meta.sample_shape) < 2):
            raise ConfigError(
                f"vdm.skip=spectral is the denoiser of a stationary field on a periodic grid: it needs samples "
                f"[C, L], [C, H, W] or [C, D, H, W] with boundary periodic, but the data's manifest says sample "
                f"shape {tuple(meta.sample_shape)}, boundary {meta.boundary}; use vdm.skip=gaussian (or none)")
        if self.skip == "sparse" and meta.data_kind != "continuous":
            raise ConfigError(f"vdm.skip=sparse is the denoiser of continuous values with a point mass at 0 (empty "
                              f"voxels); the data's manifest says data_kind {meta.data_kind!r}: use vdm.skip=discrete (the "
                              f"denoiser of discrete levels), vdm.skip=gaussian or none")
        if self.skip == "discrete" and meta.data_kind == "continuous":
            raise ConfigError("vdm.skip=discrete is the denoiser of values on a finite set of levels (data_kind "
                              "spins or levels); the data's manifest says data_kind 'continuous': use vdm.skip="
                              "gaussian, sparse (empty voxels) or spectral (periodic fields)")
        if self.sample_grid == "spin-variance" and meta.data_kind != "spins":
            raise ConfigError(f"vdm.sample_grid=spin-variance places the noise levels by the posterior variance of "
                              f"a +-1 spin; the data's manifest says data_kind {meta.data_kind!r}: use time or logsnr")
        if self.data_transform == "log-label-fraction":
            if meta.data_kind != "continuous" or meta.label_kind != "continuous":
                raise ConfigError(
                    f"vdm.data_transform=log-label-fraction divides each sample by its continuous label (a "
                    f"shower's incident energy): it needs continuous data with continuous labels, but the data's "
                    f"manifest says data_kind {meta.data_kind!r}, label_kind {meta.label_kind!r}; "
                    f"use vdm.data_transform=none")
            lowest = (min(meta.label_values) if meta.label_values else
                      meta.label_range[0] if meta.label_range else None)
            if lowest is not None and lowest <= 0:
                raise ConfigError(f"vdm.data_transform=log-label-fraction needs positive labels; the data's "
                                  f"manifest has labels down to {lowest}")

# The keys only one of the two denoiser networks reads (pipeline.objectives.vdm.denoiser).
_UNET_ONLY_KEYS = ("channels", "unet_levels", "periodic", "activation_checkpointing")
_MLP_ONLY_KEYS = ("mlp_hidden", "mlp_layers")
_IMPORTANCE_SAMPLERS = ("importance", "importance-cv")
_IMPORTANCE_KEYS = ("importance_history", "importance_uniform_mix", "importance_num_bins")

SAMPLER_NAMES = ("ancestral", "ddim", "dpm-solver")
GRID_SPACINGS = ("time", "logsnr", "spin-variance")


@dataclass(frozen=True)
class SamplerConfig:
    """How a VDM is sampled (``pipeline sample --sampler ... --eta ... --grid ...``); the number of
    steps is passed beside it, as for any objective. The algorithms: :mod:`.samplers`."""

    name: str = "ancestral"
    eta: float | None = None  # DDIM only: 0 = deterministic (probability-flow), 1 = ancestral; default 0
    # Grid of noise levels: "time" is uniform in t (for a linear schedule it is also uniform in log-SNR),
    # "logsnr" uniform in lambda = -gamma/2 (DPM-Solver++'s choice, Lu et al. 2022 sec. 3.4),
    # "spin-variance" (+-1 spins) a density of levels following the posterior variance of one spin
    # (samplers.spin_variance_grid); the last two in continuous time only. None: the model's
    # vdm.sample_grid ("time" unless the preset says otherwise).
    spacing: str | None = None

    def validate(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ConfigError(f"unknown sampler {self.name!r}; allowed: {', '.join(SAMPLER_NAMES)}")
        if self.eta is not None and self.name != "ddim":
            raise ConfigError(f"--eta applies to --sampler ddim only, not to {self.name!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: ancestral), got {self.eta}")
        if self.spacing is not None and self.spacing not in GRID_SPACINGS:
            raise ConfigError(f"unknown grid spacing {self.spacing!r}; allowed: {', '.join(GRID_SPACINGS)}")


def sampler_from_options(name: str | None, eta: float | None, grid: str | None) -> SamplerConfig | None:
    """The CLI's --sampler/--eta/--grid as a SamplerConfig; None when none is given (the model's
    default, and the only value a model that samples in one pass accepts)."""
    if name is None and eta is None and grid is None:
        return None
    return SamplerConfig(name=name or "ancestral", eta=eta, spacing=grid)
