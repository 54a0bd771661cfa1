"""The VDM objective module: the training estimate of the negative ELBO, and ancestral sampling.

The derivation (Kingma et al. 2021; Luo 2022) is in the package docstring; the terms are
computed by :mod:`pipeline.objectives.vdm.terms`, this module draws the noise and the time
steps (in a fixed order: the reconstruction's noise, the time steps, the diffusion term's
noise) and holds the weights, the schedule and the sampler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import AllGather, Report, SampledObjective, StepContext
from pipeline.objectives.vdm import terms
from pipeline.objectives.vdm.config import VDMConfig
from pipeline.objectives.vdm.denoiser import Denoiser, build_network
from pipeline.objectives.vdm.schedules import LearnedSchedule, build_schedule
from pipeline.objectives.vdm.timesteps import ImportanceSampler, build_timestep_sampler


@dataclass
class VDMOutput:
    loss: torch.Tensor  # scalar to back-propagate: negative ELBO estimate, batch mean, bits/dim
    loss_recon: torch.Tensor  # batch-mean terms, bits/dim
    loss_prior: torch.Tensor
    loss_diff: torch.Tensor  # importance-weighted diffusion term
    bits_per_dim: torch.Tensor  # = loss_recon + loss_prior + loss_diff (detached)
    t: torch.Tensor  # [B] time tau in [0, 1] of each sample's diffusion term (the noisier latent)
    gamma: torch.Tensor  # [B] its -log SNR (for loss-vs-noise-level profiles)
    u: torch.Tensor  # [B] sampler coordinate in [0, 1) (bin = floor(u * num_bins))
    diff_per_sample: torch.Tensor  # [B] unweighted diffusion-term estimate, bits/dim (detached)
    weight: torch.Tensor  # [B] importance weights (1 unless timestep_sampler=importance)
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        m = {
            "recon_bpd": float(self.loss_recon),
            "prior_bpd": float(self.loss_prior),
            "diffusion_bpd": float(self.loss_diff),
            "bits_per_dim": float(self.bits_per_dim),
        }
        m.update(self.extra)
        return m


# ---------------------------------------------------------------------------------------


class VDM(SampledObjective):
    """The VDM objective: forward(batch, ctx) -> VDMOutput; sample(); after_micro_step(); report()."""

    def __init__(self, cfg: VDMConfig, meta: DataMeta, denoiser: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        cfg.check_data(meta)
        self.cfg, self.meta = cfg, meta
        self.sample_shape = tuple(meta.sample_shape)
        self.num_dims = int(np.prod(self.sample_shape))
        self.T = cfg.num_timesteps
        self.continuous = self.T == 0
        self._register_decoder_values(meta)
        self.schedule = build_schedule(cfg.schedule, cfg.gamma_min, cfg.gamma_max, cfg.learn_endpoints)
        # The diffusion term in continuous time may be integrated along a different, learned
        # time map with the same endpoints (Kingma et al. App. I.2); when the schedule itself
        # is learned it is its own time map, as in Kingma et al.
        self.learned_time = cfg.timestep_sampler == "learned-schedule"
        if self.learned_time and not isinstance(self.schedule, LearnedSchedule):
            self.time_map = LearnedSchedule(cfg.gamma_min, cfg.gamma_max, learn_endpoints=False)
        num_bins = self.T - 1 if not self.continuous else cfg.importance_num_bins
        self.sampler = build_timestep_sampler(
            cfg.timestep_sampler, num_bins, cfg.importance_history, cfg.importance_uniform_mix
        )
        if denoiser is None:
            denoiser = Denoiser(build_network(cfg, meta), cfg.emb_dim, meta)
        self.denoiser = denoiser
        self._reset_watch()

    def _register_decoder_values(self, meta: DataMeta) -> None:
        # Discrete decoder values in model space [-1, 1].
        if meta.data_kind == "spins":
            self.register_buffer("values", torch.tensor([-1.0, 1.0]), persistent=False)
        elif meta.data_kind == "levels":
            if not meta.num_levels or meta.num_levels < 2:
                raise ValueError(f"data_kind 'levels' needs num_levels >= 2 in DataMeta, got {meta.num_levels}")
            self.register_buffer("values", torch.linspace(-1.0, 1.0, meta.num_levels), persistent=False)
        elif meta.data_kind == "continuous":
            self.values = None
        else:
            raise ValueError(f"unknown data_kind {meta.data_kind!r}; allowed: spins, levels, continuous")

    def _reset_watch(self) -> None:
        # What a person watching the run wants between two logging steps (this rank only):
        # the diffusion loss binned over t, and the spread of the per-batch ELBO estimate.
        from pipeline.track.metrics import RunningMoments, TimeProfile

        self._profile = TimeProfile(num_bins=20, t_min=0.0, t_max=1.0)
        self._elbo_moments = RunningMoments()

    # ----------------------------------------------------------------- data <-> model space
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Raw batch values -> [-1, 1] (discrete data) or unchanged (continuous)."""
        kind = self.meta.data_kind
        if kind == "spins":
            if not bool(((x == 1) | (x == -1)).all()):
                raise ValueError("data_kind 'spins' needs every value of batch['x'] to be +1 or -1")
            return x
        if kind == "levels":
            k = self.meta.num_levels
            if not bool(((x >= 0) & (x <= k - 1) & (x == x.round())).all()):
                raise ValueError(f"data_kind 'levels' needs integer values 0..{k - 1} in batch['x']")
            return 2 * x / (k - 1) - 1
        return x

    def _value_index(self, x_raw: torch.Tensor) -> torch.Tensor:
        if self.meta.data_kind == "spins":
            return (x_raw > 0).long()
        return x_raw.long()

    def check_labels(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """``labels`` as one label per sample [batch_size] (None for an unconditional VDM); ValueError
        when they do not fit this VDM (missing, superfluous, miscounted, or a class out of range)."""
        if self.meta.label_kind == "none":
            if labels is not None:
                raise ValueError("this VDM is unconditional (label_kind 'none') but labels were given")
            return None
        if labels is None:
            raise ValueError(f"this VDM is conditioned on labels (label_kind {self.meta.label_kind!r}): pass labels")
        labels = labels.reshape(-1)
        if labels.shape[0] != batch_size:
            raise ValueError(f"need one label per sample: got {labels.shape[0]} labels for {batch_size} samples")
        if self.meta.label_kind == "class":
            n = self.meta.num_classes
            if bool(((labels < 0) | (labels >= n)).any()):
                raise ValueError(f"class labels must be in 0..{n - 1}")
        return labels

    # ----------------------------------------------------------------- schedule helpers
    def gamma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) of the model's schedule."""
        return self.schedule(t)

    def endpoints(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        g, _ = self.schedule(torch.tensor([0.0, 1.0], device=device))
        return g[0], g[1]

    def latent_time(self, t_index: torch.Tensor) -> torch.Tensor:
        """tau_t = (t - 1) / (T - 1) of latent x_t, t = 1..T (discrete time)."""
        return (t_index.float() - 1) / (self.T - 1)

    # ----------------------------------------------------------------- ELBO terms (nats)
    def recon_nats(self, x0: torch.Tensor, x_raw: torch.Tensor, gamma_0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """-log p(x_0 | z_1) at z_1 = alpha_1 x_0 + sigma_1 eps (one-sample estimate), per sample."""
        value_index = self._value_index(x_raw) if self.values is not None else None
        return terms.reconstruction_nats(x0, gamma_0, eps, self.values, value_index)

    def prior_nats(self, x0: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in closed form, per sample (Luo eq. 58's prior matching)."""
        return terms.prior_nats(x0, gamma_1)

    def _time_map(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """gamma, gamma' of the diffusion term's time; with learned-schedule, through the learned map."""
        if not self.learned_time:
            g, dg = self.schedule(u)
            return g, dg, None
        tm = self.schedule if isinstance(self.schedule, LearnedSchedule) else self.time_map
        return terms.learned_time_map(tm, u)

    def diffusion_nats(
        self, x0: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]:
        """Per-sample estimate of the diffusion term (nats), unbiased under uniform u.

        Returns (loss [B], tau [B], gamma [B] of the noisier latent, gradient holder or None).
        """
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)

        def eps_model(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
            return self.denoiser(z, gamma, labels)

        if self.continuous:
            g, dg, holder = self._time_map(u)
            return terms.diffusion_continuous_nats(x0, eps, g, dg, eps_model), u, g, holder
        K = self.T - 1
        k = (u * K).long().clamp_(0, K - 1)
        if self.cfg.diffusion_form == "denoising_matching":
            loss, tau, g = terms.diffusion_denoising_nats(x0, eps, k, K, self.schedule, eps_model)
            return loss, tau, g, None
        # The consistency form draws x_{t+1} given x_t: a second noise draw, after eps.
        eps_step = torch.randn(x0.shape, device=x0.device, generator=generator)
        loss, tau, g = terms.diffusion_consistency_nats(x0, eps, eps_step, k, K, self.schedule, eps_model)
        return loss, tau, g, None

    def _prior_nats_of_form(self, x0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
        if self.cfg.diffusion_form == "consistency":
            g_prev, _ = self.schedule(torch.tensor((self.T - 2) / (self.T - 1), device=x0.device))
            return terms.prior_consistency_nats(x0, g_prev, g1)
        return terms.prior_nats(x0, g1)

    # ----------------------------------------------------------------- training step
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        ctx: StepContext,
        *,
        noise_generator: torch.Generator | None = None,
        time_generator: torch.Generator | None = None,
    ) -> VDMOutput:
        """One training estimate of the negative ELBO. The generators (default: the global RNG)
        let a benchmark hold the noise eps fixed while redrawing the time steps, or vice versa."""
        x_raw = batch["x"]
        if tuple(x_raw.shape[1:]) != self.sample_shape:
            raise ValueError(f"batch['x'] has sample shape {tuple(x_raw.shape[1:])}, expected {self.sample_shape}")
        x0 = self.to_model_space(x_raw.float())
        B = x0.shape[0]
        labels = self.check_labels(batch.get("label"), B)
        g0, g1 = self.endpoints(x0.device)
        recon = self.recon_nats(x0, x_raw, g0, torch.randn(x0.shape, device=x0.device, generator=noise_generator))
        prior = self._prior_nats_of_form(x0, g1)
        u, w = self.sampler(B, ctx, x0.device, time_generator)
        diff, tau, gam, holder = self.diffusion_nats(x0, u, labels, noise_generator)
        to_bpd = 1.0 / (self.num_dims * math.log(2))
        diff_w = w * diff
        per_sample = recon + prior + diff_w
        loss = per_sample.mean() * to_bpd
        if holder is not None:
            # Interior of the learned time map: gradient of E[L^2] instead of E[L] (App. I.2).
            holder["scale"] = 2 * (diff_w * to_bpd).detach()
        extra = self.sampler.metrics(w)
        return VDMOutput(
            loss=loss,
            loss_recon=(recon.mean() * to_bpd).detach(),
            loss_prior=(prior.mean() * to_bpd).detach(),
            loss_diff=(diff_w.mean() * to_bpd).detach(),
            bits_per_dim=loss.detach(),
            t=tau.detach(),
            gamma=gam.detach(),
            u=u.detach(),
            diff_per_sample=(diff * to_bpd).detach(),
            weight=w.detach(),
            extra=extra,
        )

    def after_micro_step(self, output: VDMOutput, all_gather: AllGather) -> None:
        """Update the time-step sampler's loss history identically on every rank, and this
        rank's watch (per-t profile, ELBO moments), from one micro batch's output."""
        self.sampler.update(output.u, output.diff_per_sample, all_gather)
        self._profile.update(output.t.detach().cpu().numpy(), output.diff_per_sample.detach().cpu().numpy())
        self._elbo_moments.update(float(output.bits_per_dim))

    def report(self) -> Report:
        """Since the last report: the per-t diffusion-loss profile, the running variance of the
        ELBO estimate, the time-step sampler's distribution p_t and its effective sample size,
        and the noise schedule gamma(t) on a grid (which moves when it is learned)."""
        from pipeline.track.metrics import sampler_metrics

        metrics = self._elbo_moments.metrics("vdm/elbo_estimate")
        if isinstance(self.sampler, ImportanceSampler):
            metrics.update(sampler_metrics(self.sampler.probs().detach().cpu().numpy()))
        with torch.no_grad():
            grid = torch.linspace(0.0, 1.0, 5, device=self.values.device if self.values is not None else "cpu")
            gamma, _ = self.gamma(grid)
        metrics.update({f"vdm/gamma_t{t:.2f}": float(g) for t, g in zip(grid.tolist(), gamma.tolist())})
        profiles = {"vdm/t_profile": self._profile}
        self._reset_watch()
        return Report(metrics=metrics, profiles=profiles)

    # ----------------------------------------------------------------- sampling
    def sample_grid(self, num_steps: int | None, device) -> torch.Tensor:
        """Times tau_0 = 0 < ... < tau_n = 1 visited by ancestral sampling with n steps."""
        if self.continuous:
            n = num_steps if num_steps is not None else (self.cfg.sample_steps or 128)
            if n < 1:
                raise ValueError(f"num_steps must be >= 1, got {n}")
            return torch.linspace(0.0, 1.0, n + 1, device=device)
        K = self.T - 1  # transitions x_T -> ... -> x_1
        n = K if num_steps is None else num_steps
        if not 1 <= n <= K:
            raise ValueError(
                f"num_steps must be in 1..{K} for a discrete-time VDM with T={self.T} latents "
                f"({K} reverse transitions x_T -> x_1, then the decoder), got {n}"
            )
        idx = torch.from_numpy(np.round(np.linspace(0, K, n + 1)).astype(np.int64))
        return (idx.float() / K).to(device)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling: x_T ~ N(0, I), x_s ~ p(x_s | x_t) down a grid of times, x_0 ~ p(x_0 | x_1).

        Returns samples in data space: +1/-1 for spins, integer levels 0..k-1, reals otherwise.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = next(self.parameters()).device
        labels = self.check_labels(labels.to(device) if labels is not None else None, num_samples)
        taus = self.sample_grid(num_steps, device)
        gammas, _ = self.schedule(taus)
        shape = (num_samples,) + self.sample_shape
        z = torch.randn(shape, device=device, generator=generator)
        for i in range(len(taus) - 1, 0, -1):
            eps_hat = self.denoiser(z, gammas[i], labels)
            mean, var = terms.reverse_mean_var(z, gammas[i], gammas[i - 1], eps_hat)
            z = mean + var.sqrt() * torch.randn(shape, device=device, generator=generator)
        g0 = gammas[0]
        a, s2 = terms.alpha_sq(g0).sqrt(), terms.sigma_sq(g0)
        if self.values is None:
            return z / a + (s2.sqrt() / a) * torch.randn(shape, device=device, generator=generator)
        logits = -0.5 * (z.unsqueeze(-1) - a * self.values) ** 2 / s2
        idx = torch.multinomial(torch.softmax(logits.reshape(-1, len(self.values)), -1), 1, generator=generator)
        idx = idx.reshape(shape)
        if self.meta.data_kind == "spins":
            return idx.float() * 2 - 1
        return idx.float()


def build_phases(cfg: VDMConfig, meta: DataMeta, lr: float, betas: tuple[float, float]) -> list:
    """One phase: the VDM module, trained with an EMA copy (the weights sampled from)."""
    from pipeline.train.phases import Phase

    return [Phase(name="vdm", module=VDM(cfg, meta), lr=lr, betas=betas, ema=True)]
