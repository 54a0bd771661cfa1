"""The seed's theory, checked numerically (Goodfellow et al. 2014, Prop. 1 and Thm. 1).

1-D: with p_r and p_g fixed and known, a discriminator trained by DStep to convergence must
approach D*(x) = p_r / (p_r + p_g) pointwise, and L(G, D) must approach
2 JS(p_r || p_g) - 2 log 2, with JS computed independently by scipy quadrature.
2-D: an 8-mode ring trained with DStep/GStep in a tiny loop covers every mode.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate, stats

from pipeline.data.meta import DataMeta
from pipeline.models.gan_nets import MLPDiscriminator
from pipeline.objectives.gan import DStep, GANConfig, build_phases

VEC1 = DataMeta(sample_shape=(1,), data_kind="continuous")



class GaussianG(nn.Module):
    """A fixed generator: h ~ N(0, 1) -> mu + sigma h, so p_g = N(mu, sigma^2) exactly."""

    latent_dim = 1  # the entries of h, which every G declares (objectives/gan/phases.py)

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, h, labels=None):
        return self.mu + self.sigma * h


def js_divergence(p, q) -> float:
    """JS(p || q) by adaptive quadrature (the independent reference)."""
    m = lambda x: 0.5 * (p(x) + q(x))  # noqa: E731

    def kl(a):
        def f(x):
            ax = a(x)
            return ax * math.log(ax / m(x)) if ax > 0 else 0.0
        return integrate.quad(f, -30, 30, limit=200, points=[-2.0, 0.0, 2.0])[0]

    return 0.5 * kl(p) + 0.5 * kl(q)


def train_d(mu_g: float, sigma_g: float, num_steps: int = 1000, batch: int = 512):
    torch.manual_seed(0)
    cfg = GANConfig(loss="minimax", latent_dim=1, latent_prior="normal")
    D = MLPDiscriminator((1,), [64, 64])
    step = DStep(D, GaussianG(mu_g, sigma_g), cfg, VEC1)
    opt = torch.optim.Adam(D.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_steps, eta_min=1e-4)
    for _ in range(num_steps):
        out = step({"x": torch.randn(batch, 1)}, None)  # p_r = N(0, 1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return D


def d_logits(D, xs: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return D(torch.tensor(xs, dtype=torch.float32)[:, None]).squeeze(1).double()


def value_by_integration(D, p_r, p_g) -> float:
    """L(G, D) = int p_r log D + p_g log(1 - D) dx on a fine grid (no sampling noise)."""
    xs = np.linspace(-10, 10, 20001)
    lg = d_logits(D, xs)
    integrand = p_r(xs) * F.logsigmoid(lg).numpy() + p_g(xs) * F.logsigmoid(-lg).numpy()
    return float(np.trapezoid(integrand, xs))


def test_trained_discriminator_approaches_optimal_d_and_js():
    mu_g, sigma_g = 1.5, 0.6
    p_r = lambda x: stats.norm.pdf(x, 0.0, 1.0)  # noqa: E731
    p_g = lambda x: stats.norm.pdf(x, mu_g, sigma_g)  # noqa: E731
    D = train_d(mu_g, sigma_g)

    grid = np.linspace(-2.0, 3.0, 101)  # where both densities have mass
    d_star = p_r(grid) / (p_r(grid) + p_g(grid))
    d_hat = torch.sigmoid(d_logits(D, grid)).numpy()
    assert np.abs(d_hat - d_star).max() < 0.04
    # an untrained D is far from D*: the check can fail
    D0 = MLPDiscriminator((1,), [64, 64])
    assert np.abs(torch.sigmoid(d_logits(D0, grid)).numpy() - d_star).max() > 0.2

    js = js_divergence(p_r, p_g)
    assert 0.2 < js < math.log(2)  # distinct, overlapping distributions
    L = value_by_integration(D, p_r, p_g)
    assert L == pytest.approx(2 * js - 2 * math.log(2), abs=0.005)
    # D* maximises L(G, .): the trained D cannot exceed it beyond integration error
    assert L <= 2 * js - 2 * math.log(2) + 1e-3
    # the objective's own Monte-Carlo estimate of JS agrees with quadrature
    cfg = GANConfig(loss="minimax", latent_dim=1, latent_prior="normal")
    torch.manual_seed(1)
    est = DStep(D, GaussianG(mu_g, sigma_g), cfg, VEC1)({"x": torch.randn(100_000, 1)}, None)
    assert est.metrics()["js_estimate"] == pytest.approx(js, abs=0.01)


def test_equal_distributions_give_d_one_half_and_minus_log_four():
    p = lambda x: stats.norm.pdf(x, 0.0, 1.0)  # noqa: E731
    D = train_d(0.0, 1.0, num_steps=500)
    grid = np.linspace(-2.0, 2.0, 81)
    d_hat = torch.sigmoid(d_logits(D, grid)).numpy()
    assert np.abs(d_hat - 0.5).max() < 0.03
    assert value_by_integration(D, p, p) == pytest.approx(-2 * math.log(2), abs=2e-3)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)


def ring_modes(num_modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    a = 2 * math.pi * torch.arange(num_modes) / num_modes
    return radius * torch.stack([torch.cos(a), torch.sin(a)], dim=1)


def mode_counts(x: torch.Tensor, modes: torch.Tensor, std: float) -> tuple[torch.Tensor, float]:
    """Samples within 3 std of their nearest mode, per mode; and the fraction of such samples."""
    dist, idx = torch.cdist(x, modes).min(dim=1)
    good = dist < 3 * std
    return torch.bincount(idx[good], minlength=len(modes)), good.float().mean().item()


def test_gaussian_mixture_ring_covers_all_modes():
    torch.manual_seed(0)
    modes, std = ring_modes(), 0.1  # modes 1.53 apart: 3 std neighbourhoods are disjoint

    def data(n):
        return modes[torch.randint(0, len(modes), (n,))] + std * torch.randn(n, 2)

    cfg = GANConfig(loss="non-saturating", latent_dim=8, latent_prior="normal", channels=[128, 128],
                    lr_d=2e-3, lr_g=2e-3)
    phases = build_phases(cfg, DataMeta(sample_shape=(2,), data_kind="continuous"), betas=(0.5, 0.9))
    opts = [torch.optim.Adam(p.module.parameters(), lr=p.lr, betas=p.betas) for p in phases]
    g = phases[1].module

    counts0, _ = mode_counts(g.sample(2000, generator=torch.Generator().manual_seed(1)), modes, std)
    assert (counts0 >= 20).sum() < 8  # the untrained generator does not pass the check

    # The lead's loop in miniature: per loop step, `repeats` steps of each phase in order,
    # each on a fresh batch, with the phase's `frozen` modules frozen.
    for _ in range(800):
        for phase, opt in zip(phases, opts):
            for _ in range(phase.repeats):
                for m in phase.frozen:
                    m.requires_grad_(False)
                out = phase.module({"x": data(128)}, None)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                for m in phase.frozen:
                    m.requires_grad_(True)

    x = g.sample(2000, generator=torch.Generator().manual_seed(1))
    counts, good = mode_counts(x, modes, std)
    # Every mode holds >= 1% of samples (uniform coverage would be 12.5%).
    assert (counts >= 20).all(), f"modes not covered: {counts.tolist()}"
    assert good > 0.5, f"only {good:.2f} of samples within 3 std of a mode"
    m = phases[0].module({"x": data(256)}, None).metrics()
    assert m["g_collapsed"] == 0.0 and m["diversity_ratio"] > 0.5
