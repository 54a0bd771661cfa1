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
from pipeline.objectives.data_space import DataSpace
from pipeline.objectives.draws import AnyDraws, Draws, GeneratorDraws, SampleDraws, as_draws
from pipeline.objectives.vdm import samplers, terms
from pipeline.objectives.vdm.config import SamplerConfig, VDMConfig
from pipeline.objectives.vdm.denoiser import Denoiser, build_network, build_skip
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
    # vdm.skip: this micro batch's sums for the skip's moments (its batch_sums), float64
    data_sums: torch.Tensor | None = None

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
        self.space = DataSpace(meta, cfg.data_transform, cfg.data_transform_floor)
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
            # vdm.skip: the data's moments, which after_micro_step keeps up to date.
            skip = build_skip(cfg.skip, self.sample_shape, self.space)
            denoiser = Denoiser(build_network(cfg, meta), cfg.emb_dim, meta, skip=skip)
        elif cfg.skip != "none":
            raise ValueError(f"vdm.skip={cfg.skip} belongs to the VDM's own Denoiser; a given denoiser brings its own")
        self.denoiser = denoiser
        self._reset_watch()

    def _register_decoder_values(self, meta: DataMeta) -> None:
        # Discrete decoder values in model space [-1, 1] (a buffer, so it moves with the module).
        values = self.space.values()
        if values is None:
            self.values = None
        else:
            self.register_buffer("values", values, persistent=False)

    def _reset_watch(self) -> None:
        # What a person watching the run wants between two logging steps (this rank only):
        # the diffusion loss binned over t, and the spread of the per-batch ELBO estimate.
        from pipeline.track.metrics import RunningMoments, TimeProfile

        self._profile = TimeProfile(num_bins=20, t_min=0.0, t_max=1.0)
        self._elbo_moments = RunningMoments()

    # ----------------------------------------------------------------- data <-> model space
    def to_model_space(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw batch values -> [-1, 1] (discrete data, checked), unchanged (continuous) or through
        ``vdm.data_transform`` (which may scale each sample by its label)."""
        return self.space.to_model(x, labels)

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
    def recon_nats(self, x0: torch.Tensor, x_raw: torch.Tensor, gamma_0: torch.Tensor, eps: torch.Tensor,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x_0 | z_1) at z_1 = alpha_1 x_0 + sigma_1 eps (one-sample estimate), per sample.

        Of the stored values: with a ``vdm.data_transform`` the decoder's Gaussian density of the
        model-space value is carried back by the change of variables, -log |dy/dx| (the decoder is
        the one term that is a density of x; the others are KL divergences, invariant)."""
        if self.values is not None:
            return terms.reconstruction_nats(x0, gamma_0, eps, self.values, self.space.value_index(x_raw))
        return terms.reconstruction_nats(x0, gamma_0, eps, None, None) - self.space.log_abs_det(x_raw, labels)

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
        self, x0: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None, generator: AnyDraws = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]:
        """Per-sample estimate of the diffusion term (nats), unbiased under uniform u.

        Returns (loss [B], tau [B], gamma [B] of the noisier latent, gradient holder or None).
        """
        draws = as_draws(generator)
        eps = draws.normal(x0.shape, x0.device)

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
        eps_step = draws.normal(x0.shape, x0.device)
        loss, tau, g = terms.diffusion_consistency_nats(x0, eps, eps_step, k, K, self.schedule, eps_model)
        return loss, tau, g, None

    def _prior_nats_of_form(self, x0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
        if self.cfg.diffusion_form == "consistency":
            g_prev, _ = self.schedule(torch.tensor((self.T - 2) / (self.T - 1), device=x0.device))
            return terms.prior_consistency_nats(x0, g_prev, g1)
        return terms.prior_nats(x0, g1)

    # ----------------------------------------------------------------- training step
    @staticmethod
    def _draws(batch: dict[str, torch.Tensor], ctx: StepContext | None, noise_generator: torch.Generator | None,
               time_generator: torch.Generator | None) -> tuple[Draws, Draws]:
        """(noise, time-step) draws of one forward; see :meth:`forward`."""
        if noise_generator is None and time_generator is None and "index" in batch and ctx is not None:
            positions = batch["index"].cpu()
            return SampleDraws(ctx.seed, 0, positions), SampleDraws(ctx.seed, 1, positions)
        return GeneratorDraws(noise_generator), GeneratorDraws(time_generator)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        ctx: StepContext,
        *,
        noise_generator: torch.Generator | None = None,
        time_generator: torch.Generator | None = None,
    ) -> VDMOutput:
        """One training estimate of the negative ELBO.

        Where the draws come from: the generators when given (a benchmark holds the noise eps
        fixed while redrawing the time steps, or vice versa); else, when the batch carries
        each sample's global position in the data order (``batch["index"]``, as the training
        stream's batches do), each sample's own streams keyed by (``ctx.seed``, position), so
        the same sample draws the same eps and t on any number of ranks (elastic resume);
        else the global RNG."""
        x_raw = batch["x"]
        if tuple(x_raw.shape[1:]) != self.sample_shape:
            raise ValueError(f"batch['x'] has sample shape {tuple(x_raw.shape[1:])}, expected {self.sample_shape}")
        labels = self.check_labels(batch.get("label"), x_raw.shape[0])
        x0 = self.to_model_space(x_raw.float(), labels)
        B = x0.shape[0]
        g0, g1 = self.endpoints(x0.device)
        noise, times = self._draws(batch, ctx, noise_generator, time_generator)
        recon = self.recon_nats(x0, x_raw.float(), g0, noise.normal(x0.shape, x0.device), labels)
        prior = self._prior_nats_of_form(x0, g1)
        u, w = self.sampler(B, ctx, x0.device, times)
        diff, tau, gam, holder = self.diffusion_nats(x0, u, labels, noise)
        to_bpd = 1.0 / (self.num_dims * math.log(2))
        c, c_integral = self.sampler.baseline(u)  # zero but for importance-cv's control variate
        diff_w = w * (diff - c) + c_integral
        per_sample = recon + prior + diff_w
        loss = per_sample.mean() * to_bpd
        if holder is not None:
            # Interior of the learned time map: gradient of E[L^2] instead of E[L] (App. I.2).
            holder["scale"] = 2 * (diff_w * to_bpd).detach()
        extra = self.sampler.metrics(w)
        data_sums = None
        if self.cfg.skip != "none":
            data_sums = self.denoiser.skip.batch_sums(x0)
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
            data_sums=data_sums,
        )

    def after_micro_step(self, output: VDMOutput, all_gather: AllGather) -> None:
        """Gather the micro batch's (u, loss) pairs for the time-step sampler's history (applied
        after the optimizer step), and update this rank's watch (per-t profile, ELBO moments)."""
        self.sampler.collect(output.u, output.diff_per_sample, all_gather)
        if self.cfg.skip != "none":
            # Every rank adds every rank's sums (and counts), so the moments stay identical.
            sums = all_gather(output.data_sums.unsqueeze(0)).sum(0)
            count = all_gather(torch.tensor([float(output.u.shape[0])], dtype=torch.float64,
                                            device=output.data_sums.device)).sum()
            self.denoiser.skip.add(sums, count)
        self._profile.update(output.t.detach().cpu().numpy(), output.diff_per_sample.detach().cpu().numpy())
        self._elbo_moments.update(float(output.bits_per_dim))

    def after_optimizer_step(self, all_gather: AllGather) -> None:
        """Append the step's gathered pairs to the sampler's history: its proposal stays fixed
        over the whole global batch, however it is split into ranks x micro steps."""
        self.sampler.commit()

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
        """Times tau_0 = 0 < ... < tau_n = 1 visited with n steps, uniform in t (discrete time: the
        nearest latents of the chain, so the network is only asked at noise levels it was trained on)."""
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

    def sample_gammas(self, num_steps: int | None, device, spacing: str | None = None) -> torch.Tensor:
        """gamma at the grid's n + 1 points, increasing: uniform in t (``time``) or, in continuous
        time, uniform in log-SNR (``logsnr``; the network takes gamma, so no time needs inverting)
        or following a spin's posterior variance (``spin-variance``, spin data only). None: the
        model's ``vdm.sample_grid``."""
        spacing = spacing or self.cfg.sample_grid
        taus = self.sample_grid(num_steps, device)
        if spacing == "time":
            return self.schedule(taus)[0]
        if spacing not in ("logsnr", "spin-variance"):
            raise ValueError(f"unknown grid spacing {spacing!r}; allowed: time, logsnr, spin-variance")
        if not self.continuous:
            raise ValueError(f"--grid {spacing} needs a continuous-time VDM (vdm.num_timesteps=0): a discrete-time "
                             "model knows only the noise levels of its T latents; use --grid time")
        g0, g1 = self.endpoints(device)
        if spacing == "logsnr":
            return torch.linspace(float(g0), float(g1), len(taus), device=device)
        if self.meta.data_kind != "spins":
            raise ValueError(f"--grid spin-variance follows the posterior variance of a +-1 spin; this model's data "
                             f"are {self.meta.data_kind!r}: use --grid time or logsnr")
        return samplers.spin_variance_grid(float(g0), float(g1), len(taus) - 1).to(device=device, dtype=g0.dtype)

    def check_sample_options(self, num_steps: int | None, sampler: SamplerConfig | None) -> None:
        if sampler is not None:
            sampler.validate()
        with torch.no_grad():  # raises the error that names the fix
            self.sample_gammas(num_steps, "cpu", sampler.spacing if sampler is not None else None)

    def sampling_settings(self, num_steps: int | None, sampler: SamplerConfig | None) -> dict:
        """What :meth:`sample` will use for these options, defaults resolved (for the record)."""
        sampler = sampler or SamplerConfig()
        return {"sampler": sampler.name, "eta": sampler.eta, "grid": sampler.spacing or self.cfg.sample_grid,
                "num_steps": len(self.sample_grid(num_steps, "cpu")) - 1}

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        sampler: SamplerConfig | None = None,
    ) -> torch.Tensor:
        """z_T ~ N(0, I), down a grid of noise levels with ``sampler`` (default: ancestral,
        x_s ~ p(x_s | x_t)), then x_0 ~ p(x_0 | z at tau = 0), the decoder.

        Returns samples in data space: +1/-1 for spins, integer levels 0..k-1, reals otherwise.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        sampler = sampler or SamplerConfig()
        self.check_sample_options(num_steps, sampler)
        device = next(self.parameters()).device
        labels = self.check_labels(labels.to(device) if labels is not None else None, num_samples)
        gammas = self.sample_gammas(num_steps, device, sampler.spacing)
        shape = (num_samples,) + self.sample_shape
        z = torch.randn(shape, device=device, generator=generator)

        def eps_model(zt: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
            return self.denoiser(zt, gamma, labels)

        def noise() -> torch.Tensor:
            return torch.randn(shape, device=device, generator=generator)

        z = samplers.run_sampler(sampler.name, eps_model, z, gammas, noise, sampler.eta or 0.0)
        return self._decode(z, gammas[0], generator, labels)

    def _decode(self, z: torch.Tensor, g0: torch.Tensor, generator: torch.Generator | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        """x_0 ~ p(x_0 | z_0) in data space: the discrete decoder over the allowed values, or the
        Gaussian one (mapped back through ``vdm.data_transform``)."""
        shape = z.shape
        a, s2 = terms.alpha_sq(g0).sqrt(), terms.sigma_sq(g0)
        if self.values is None:
            y = z / a + (s2.sqrt() / a) * torch.randn(shape, device=z.device, generator=generator)
            return self.space.to_data(y, labels)
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
