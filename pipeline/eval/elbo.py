"""The exact evaluator of a VDM's negative ELBO: every diffusion term evaluated, not sampled.

Evaluation code (used by :mod:`pipeline.eval.likelihood` and ``pipeline bench variance``),
not part of training. Notation and the terms are those of :mod:`pipeline.objectives.vdm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.objectives.vdm import VDM
from pipeline.objectives.vdm.terms import noisy_latent, sum_dims

Noise = Callable[[tuple], torch.Tensor]  # shape -> a standard normal draw from the evaluator's generator


@dataclass
class _NoiseRows:
    """Each data sample repeated once per noise draw: row b * S + s is sample b's draw s."""

    x: torch.Tensor  # [B * S, *shape], model space
    x_raw: torch.Tensor  # [B * S, *shape], data space
    labels: torch.Tensor | None  # [B * S], each sample's label on each of its rows
    num_samples: int  # B
    num_draws: int  # S

    def mc(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample Monte-Carlo mean over the S draws [B], and the variance of that mean [B]."""
        v = values.reshape(self.num_samples, self.num_draws)
        return v.mean(1), v.var(1) / self.num_draws


def _eps_sq_err(module: VDM, rows: _NoiseRows, gamma: torch.Tensor, noise: Noise, chunk_size: int) -> torch.Tensor:
    """||eps - eps_hat(z_gamma, gamma)||^2 per row, at per-row (or one scalar) gamma, in chunks of rows."""
    out = []
    for i in range(0, rows.x.shape[0], chunk_size):
        x_chunk = rows.x[i : i + chunk_size]
        g_chunk = gamma[i : i + chunk_size] if gamma.dim() else gamma.expand(x_chunk.shape[0])
        eps = noise(x_chunk.shape)
        z = noisy_latent(x_chunk, g_chunk, eps)
        label_chunk = rows.labels[i : i + chunk_size] if rows.labels is not None else None
        out.append(sum_dims((eps - module.denoiser(z, g_chunk, label_chunk)) ** 2))
    return torch.cat(out)


def _quadrature_terms(
    module: VDM, rows: _NoiseRows, g0: torch.Tensor, g1: torch.Tensor, num_points: int, noise: Noise, chunk_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Continuous time: 0.5 int_{gamma_min}^{gamma_max} E||eps - eps_hat(z_gamma, gamma)||^2 dgamma
    (Kingma et al. eq. 17 written in gamma) by Gauss-Legendre quadrature; (mean, var) per node."""
    device = rows.x.device
    nodes, weights = np.polynomial.legendre.leggauss(num_points)
    lo, hi = float(g0), float(g1)
    gam = torch.tensor(lo + (hi - lo) * (nodes + 1) / 2, dtype=torch.float32, device=device)
    wts = torch.tensor(weights * (hi - lo) / 2, dtype=torch.float32, device=device)
    return [rows.mc(0.5 * wq * _eps_sq_err(module, rows, g, noise, chunk_size)) for g, wq in zip(gam, wts)]


def _discrete_terms(module: VDM, rows: _NoiseRows, noise: Noise, chunk_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Discrete time: every denoising-matching term t = 2..T (Luo eq. 58, Kingma et al. eq. 13); (mean, var) per term."""
    K = module.T - 1
    taus = torch.arange(K + 1, device=rows.x.device, dtype=torch.float32) / K
    gs, _ = module.schedule(taus)
    # term t = k + 2
    return [rows.mc(0.5 * torch.expm1(gs[k + 1] - gs[k]) * _eps_sq_err(module, rows, gs[k + 1], noise, chunk_size))
            for k in range(K)]


@torch.no_grad()
def exact_elbo(
    module: VDM,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_noise_samples: int = 16,
    num_quadrature_points: int = 64,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> dict:
    """Negative ELBO of ``x`` with every diffusion term evaluated, not sampled.

    Discrete time: the sum over all T - 1 denoising-matching terms t = 2..T (Luo eq. 58;
    either form gives the same ELBO in expectation, this one has the lower variance).
    Continuous time: the integral 0.5 int gamma'(tau) E||eps - eps_hat||^2 dtau written
    in gamma, 0.5 int_{gamma_min}^{gamma_max} E||eps - eps_hat(z_gamma, gamma)||^2 dgamma
    (schedule-free; Kingma et al. eq. 17 after substitution), by Gauss-Legendre quadrature
    with ``num_quadrature_points`` nodes. Inner expectations over the noise are
    Monte-Carlo averages over ``num_noise_samples`` draws; ``stderr_bpd`` is the standard
    error of the batch-mean bits/dim from that noise (the prior term is exact).

    Returns floats ``recon_bpd``, ``prior_bpd``, ``diffusion_bpd``, ``bits_per_dim``,
    ``stderr_bpd``; tensors ``per_term_bpd`` (batch-mean bits/dim of each diffusion term,
    or of each quadrature node's weighted contribution), ``per_sample_bpd`` [B], the same per
    sample ``term_mean_bpd`` [B, num_terms], the noise variance of one draw:
    ``term_noise_var_bpd`` [B, num_terms], ``recon_noise_var_bpd`` [B], and
    ``term_uniform_prob`` [num_terms], the probability with which uniform t picks each term
    (1 / (T - 1); in continuous time a node's share of a uniform draw of gamma, its weight).
    """
    if num_noise_samples < 2:
        raise ValueError(f"num_noise_samples must be >= 2 (for a standard error), got {num_noise_samples}")
    if num_quadrature_points < 1:
        raise ValueError(f"num_quadrature_points must be >= 1, got {num_quadrature_points}")
    device = next(module.parameters()).device
    x0, rows = _noise_rows(module, x, labels, num_noise_samples, device)

    def noise(shape):
        return torch.randn(shape, device=device, generator=generator)

    # The order of the draws from ``generator``: reconstruction first, then each term's.
    g0, g1 = module.endpoints(device)
    recon = rows.mc(module.recon_nats(rows.x, rows.x_raw, g0, noise(rows.x.shape), rows.labels))
    prior = module.prior_nats(x0, g1)
    if module.continuous:
        terms = _quadrature_terms(module, rows, g0, g1, num_quadrature_points, noise, chunk_size)
        # a uniform draw of gamma lands in node j's share of [gamma_min, gamma_max]: its weight
        uniform_prob = torch.from_numpy(np.polynomial.legendre.leggauss(num_quadrature_points)[1] / 2)
    else:
        terms = _discrete_terms(module, rows, noise, chunk_size)
        uniform_prob = torch.full((len(terms),), 1.0 / len(terms), dtype=torch.float64)
    out = _in_bits(recon, prior, terms, 1.0 / (module.num_dims * math.log(2)), num_noise_samples)
    out["term_uniform_prob"] = uniform_prob
    return out


def _noise_rows(module: VDM, x: torch.Tensor, labels: torch.Tensor | None, num_draws: int,
                device: torch.device) -> tuple[torch.Tensor, _NoiseRows]:
    """``x`` in model space [B, ...], and ``x`` (data space) with its labels on ``device``, checked,
    each sample repeated ``num_draws`` times."""
    x_raw = x.to(device).float()
    labels = module.check_labels(labels.to(device) if labels is not None else None, x_raw.shape[0])
    x0 = module.to_model_space(x_raw, labels)
    repeated = labels.repeat_interleave(num_draws, 0) if labels is not None else None
    return x0, _NoiseRows(x0.repeat_interleave(num_draws, 0), x_raw.repeat_interleave(num_draws, 0), repeated,
                          x0.shape[0], num_draws)


def _in_bits(recon: tuple[torch.Tensor, torch.Tensor], prior: torch.Tensor,
             terms: list[tuple[torch.Tensor, torch.Tensor]], to_bpd: float, num_draws: int) -> dict:
    """:func:`exact_elbo`'s result from the per-sample (mean, variance of the mean) in nats of the
    reconstruction and of each diffusion term, and the exact prior term; ``to_bpd``: nats -> bits/dim;
    ``num_draws``: noise draws behind each mean (a single draw's variance is ``num_draws`` x the
    variance of the mean)."""
    recon_m, recon_v = recon
    tm = torch.stack([m for m, _ in terms], 1)  # [B, num_terms]
    tv = torch.stack([v for _, v in terms], 1)
    diff = tm.sum(1)
    per_sample = recon_m + prior + diff
    var_per_sample = recon_v + tv.sum(1)
    return {
        "recon_bpd": float(recon_m.mean() * to_bpd),
        "prior_bpd": float(prior.mean() * to_bpd),
        "diffusion_bpd": float(diff.mean() * to_bpd),
        "bits_per_dim": float(per_sample.mean() * to_bpd),
        "stderr_bpd": float(var_per_sample.sum().sqrt() / per_sample.shape[0] * to_bpd),
        "per_term_bpd": (tm.mean(0) * to_bpd).cpu(),
        "per_sample_bpd": (per_sample * to_bpd).cpu(),
        "term_mean_bpd": (tm * to_bpd).cpu(),  # [B, num_terms], each a mean over the draws
        # Variance over the noise of one draw of each term, per sample ((bits/dim)^2): what no
        # choice of time steps can remove (``pipeline bench variance``'s noise floor).
        "term_noise_var_bpd": (tv * num_draws * to_bpd**2).cpu(),
        "recon_noise_var_bpd": (recon_v * num_draws * to_bpd**2).cpu(),
    }
