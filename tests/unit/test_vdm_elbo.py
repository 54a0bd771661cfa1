"""Discrete-time VDM ELBO against an independent brute-force implementation.

The reference below is written from Luo 2022 ("Understanding Diffusion Models"), in float64,
with alpha_t / abar_t and torch.distributions KLs: eq. 84-85 for q(x_{t-1} | x_t, x_0),
eq. 58 for the three terms. It shares nothing with the module but the network and the
schedule's gamma values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import StepContext
from pipeline.eval.elbo import exact_elbo
from pipeline.objectives.vdm import VDM, VDMConfig

T = 20
D = 4


def tiny_vdm(data_kind="spins", num_levels=None, **kw) -> VDM:
    torch.manual_seed(0)
    cfg = VDMConfig(
        num_timesteps=T, architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8,
        timestep_sampler="uniform", gamma_min=-6.0, gamma_max=4.0, **kw,
    )
    m = VDM(cfg, DataMeta(sample_shape=(D,), data_kind=data_kind, num_levels=num_levels))
    # A non-trivial denoiser: the output layer starts at zero, give it weights.
    with torch.no_grad():
        m.denoiser.net.out.weight.normal_(0, 0.5)
        m.denoiser.net.out.bias.normal_(0, 0.3)
    return m


def data(n=3):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, D, generator=g) < 0.5).double() * 2 - 1


def abar_alpha(m: VDM):
    """abar_t and alpha_t for t = 1..T (index t - 1), float64."""
    taus = (torch.arange(1, T + 1, dtype=torch.float64) - 1) / (T - 1)
    gam = m.schedule(taus.float())[0].double()
    abar = torch.sigmoid(-gam)
    alpha = abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return gam, abar, alpha


def luo_kl(m, x, t, eps, gam, abar, alpha):
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) per row, Luo eq. 84-85, float64."""
    ab_t, ab_s, a_t = abar[t - 1], abar[t - 2], alpha[t - 1]
    xt = ab_t.sqrt() * x + (1 - ab_t).sqrt() * eps
    with torch.no_grad():
        eps_hat = m.denoiser(xt.float(), gam[t - 1].float(), None).double()
    xhat = (xt - (1 - ab_t).sqrt() * eps_hat) / ab_t.sqrt()

    def mu(x0):
        return (a_t.sqrt() * (1 - ab_s) * xt + ab_s.sqrt() * (1 - a_t) * x0) / (1 - ab_t)

    std = ((1 - a_t) * (1 - ab_s) / (1 - ab_t)).sqrt()
    return kl_divergence(Normal(mu(x), std), Normal(mu(xhat), std)).sum(-1)


def brute_force(m, x, num_draws, seed=7):
    """Mean and standard error (per data row) of recon + prior + sum_t KL_t, every t looped."""
    g = torch.Generator().manual_seed(seed)
    gam, abar, alpha = abar_alpha(m)
    xr = x.repeat_interleave(num_draws, 0)
    eps = torch.randn(xr.shape, generator=g, dtype=torch.float64)
    x1 = abar[0].sqrt() * xr + (1 - abar[0]).sqrt() * eps
    std1 = (1 - abar[0]).sqrt()
    logq = torch.stack([Normal(abar[0].sqrt() * v, std1).log_prob(x1) for v in (-1.0, 1.0)], -1)
    logq_x = Normal(abar[0].sqrt() * xr, std1).log_prob(x1)
    recon = -(logq_x - torch.logsumexp(logq, -1)).sum(-1)
    prior = kl_divergence(Normal(abar[-1].sqrt() * x, (1 - abar[-1]).sqrt()), Normal(0.0, 1.0)).sum(-1)
    total = recon.view(-1, num_draws)
    var = total.var(1) / num_draws
    total = total.mean(1) + prior
    for t in range(2, T + 1):
        eps = torch.randn(xr.shape, generator=g, dtype=torch.float64)
        kl = luo_kl(m, xr, t, eps, gam, abar, alpha).view(-1, num_draws)
        total = total + kl.mean(1)
        var = var + kl.var(1) / num_draws
    return total, var


def test_each_diffusion_term_equals_luo_kl_with_the_same_noise():
    m = tiny_vdm()
    x = data(2)
    K = T - 1
    xk = x.repeat(K, 1)  # row r: term k = r // 2
    u = ((torch.arange(K).repeat_interleave(2) + 0.5) / K).float()
    out, tau, _, _ = m.diffusion_nats(xk.float(), u, None, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(xk.shape, generator=torch.Generator().manual_seed(3)).double()  # the module's first draw
    gam, abar, alpha = abar_alpha(m)
    for k in range(K):
        t = k + 2
        rows = slice(2 * k, 2 * k + 2)
        ref = K * luo_kl(m, xk[rows], t, eps[rows], gam, abar, alpha)
        torch.testing.assert_close(out[rows].double(), ref, rtol=2e-4, atol=1e-6)
        assert torch.allclose(tau[rows], torch.tensor((t - 1) / (T - 1)))


def test_prior_term_matches_closed_form():
    m = tiny_vdm()
    x = data(5)
    g1 = m.endpoints("cpu")[1]
    ab = torch.sigmoid(-g1.double())
    ref = kl_divergence(Normal(ab.sqrt() * x, (1 - ab).sqrt()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(m.prior_nats(x.float(), g1).double(), ref, rtol=1e-5, atol=1e-7)
    out = m({"x": x.float()}, StepContext(0, 0, 1, 0, 1))
    torch.testing.assert_close(out.loss_prior.double(), ref.mean() / (D * math.log(2)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,levels", [("spins", None), ("levels", 5)])
def test_discrete_decoder_is_a_normalised_likelihood(kind, levels):
    torch.manual_seed(0)
    cfg = VDMConfig(num_timesteps=T, architecture="mlp", mlp_hidden=8, mlp_layers=1, emb_dim=8, gamma_min=-1.0)
    m = VDM(cfg, DataMeta(sample_shape=(D,), data_kind=kind, num_levels=levels))
    vals = torch.tensor([-1.0, 1.0]) if kind == "spins" else torch.linspace(-1, 1, levels)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(vals), (6, D), generator=g)
    x_raw = vals[idx] if kind == "spins" else idx.float()
    x0 = m.to_model_space(x_raw)
    torch.testing.assert_close(x0, vals[idx])
    eps = torch.randn(x0.shape, generator=g)
    g0 = m.endpoints("cpu")[0]
    a, s = torch.sigmoid(-g0.double()).sqrt(), torch.sigmoid(g0.double()).sqrt()
    z = a * x0.double() + s * eps.double()
    logq = torch.stack([Normal(a * v, s).log_prob(z) for v in vals.double()], -1)
    ref = -(logq.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logq, -1)).sum(-1)
    torch.testing.assert_close(m.recon_nats(x0, x_raw, g0, eps).double(), ref, rtol=1e-4, atol=1e-5)
    # Summed over every configuration of the D values at one fixed z, p(x | z) is 1
    # (gamma_min = -1: the decoder is far from deterministic, so this is not trivially true).
    configs = torch.cartesian_prod(*[torch.arange(len(vals))] * D)
    xc_raw = vals[configs] if kind == "spins" else configs.float()
    xc = m.to_model_space(xc_raw)
    z_fixed = torch.randn(1, D, generator=g)
    a32, s32 = float(a), float(s)
    eps_c = (z_fixed - a32 * xc) / s32  # the noise that puts every configuration at z_fixed
    total = torch.exp(-m.recon_nats(xc, xc_raw, g0, eps_c).double()).sum()
    assert abs(float(total) - 1) < 1e-4, float(total)


def test_exact_elbo_equals_bruteforce_sum_over_every_t():
    m = tiny_vdm()
    x = data(3)
    ref, ref_var = brute_force(m, x, num_draws=3000)
    r = exact_elbo(m, x.float(), num_noise_samples=3000, generator=torch.Generator().manual_seed(11))
    to_bpd = 1 / (D * math.log(2))
    se = math.sqrt(float(ref_var.sum()) / 9 * to_bpd**2 + r["stderr_bpd"] ** 2)
    assert abs(r["bits_per_dim"] - float(ref.mean()) * to_bpd) < 4 * se, (r, float(ref.mean()) * to_bpd, se)
    assert abs(r["recon_bpd"] + r["prior_bpd"] + r["diffusion_bpd"] - r["bits_per_dim"]) < 1e-5
    assert r["per_term_bpd"].shape == (T - 1,)
    assert abs(float(r["per_term_bpd"].sum()) - r["diffusion_bpd"]) < 1e-4


def test_training_estimator_is_unbiased_for_the_exact_sum():
    m = tiny_vdm()
    x = data(3)
    ref, ref_var = brute_force(m, x, num_draws=3000, seed=5)
    to_bpd = 1 / (D * math.log(2))
    torch.manual_seed(123)
    xb = x.float().repeat(2000, 1)  # one forward = 6000 one-t-per-sample estimates
    with torch.no_grad():
        out = m({"x": xb}, StepContext(0, 0, 1, 0, 1))
    per_sample = out.diff_per_sample * out.weight  # bits/dim, one uniformly drawn t each
    est = float(out.loss)
    se_est = float(per_sample.std()) / math.sqrt(len(per_sample))
    se = math.sqrt(se_est**2 + float(ref_var.sum()) / 9 * to_bpd**2)
    assert abs(est - float(ref.mean()) * to_bpd) < 4 * se, (est, float(ref.mean()) * to_bpd, se)
    # The three reported terms add up to the loss.
    assert abs(float(out.loss_recon + out.loss_prior + out.loss_diff) - est) < 1e-5
