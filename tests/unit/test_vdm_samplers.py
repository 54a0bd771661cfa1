"""The VDM's samplers (ancestral, DDIM, DPM-Solver++(2M)) against closed forms on Gaussian data.

Data x ~ N(MU, S2) per dimension: the exact denoiser E[x | z_t] is linear,
x_hat = MU + alpha S2 / (alpha^2 S2 + sigma^2) (z - alpha MU), and so is the exact
probability-flow ODE: the marginals are N(m_t, v_t) with m_t = alpha_t MU and
v_t = alpha_t^2 S2 + sigma_t^2, and the flow keeps (z_t - m_t) / sqrt(v_t) constant, so a
trajectory started at z_T ends at z_0 = m_0 + sqrt(v_0 / v_T) (z_T - m_T) exactly. That is
the independent reference for the deterministic samplers' error and order.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm import samplers
from pipeline.objectives.vdm.config import SamplerConfig

MU, S2 = 0.7, 0.5


def exact_eps(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps_hat = (z - alpha E[x | z]) / sigma for x ~ N(MU, S2), in z's dtype (computed in float64)."""
    g = gamma.double()
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    zd = z.double()
    x_hat = MU + a * S2 / (a * a * S2 + s * s) * (zd - a * MU)
    return ((zd - a * x_hat) / s).to(z.dtype)


def exact_flow(z_T: torch.Tensor, g0: float, g1: float) -> torch.Tensor:
    """The probability-flow ODE's exact solution from gamma g1 down to g0 (module docstring)."""
    def m_v(g):
        a2, s2 = 1 / (1 + math.exp(g)), 1 / (1 + math.exp(-g))
        return math.sqrt(a2) * MU, a2 * S2 + s2
    m0, v0 = m_v(g0)
    m1, v1 = m_v(g1)
    return m0 + math.sqrt(v0 / v1) * (z_T - m1)


class ExactDenoiser(nn.Module):
    """The VDM's denoiser slot filled with :func:`exact_eps` (a dummy parameter gives it a device)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z, gamma, label=None):
        return exact_eps(z, gamma)


def gaussian_vdm(gamma_min=-12.0, gamma_max=14.0, T=0) -> VDM:
    cfg = VDMConfig(num_timesteps=T, schedule="linear", gamma_min=gamma_min, gamma_max=gamma_max,
                    architecture="mlp", mlp_hidden=8, mlp_layers=1, emb_dim=8)
    return VDM(cfg, DataMeta(sample_shape=(1,), data_kind="continuous"), denoiser=ExactDenoiser())


def _no_noise():
    raise AssertionError("a deterministic sampler drew noise")


# ------------------------------------------------------------------ distribution of samples


@pytest.mark.parametrize("name,num_steps", [("ddim", 1000), ("dpm-solver", 200), ("ancestral", 1000)])
def test_samplers_at_many_steps_match_the_data_mean_and_variance(name, num_steps):
    # gamma in [-12, 14]: the prior mismatch (alpha_1^2 = 8e-7) and the decoder's blur
    # (sigma_0^2 / alpha_0^2 = 6e-6) are far below the standard errors of 8000 samples.
    n = 8000
    x = gaussian_vdm().sample(n, num_steps=num_steps, generator=torch.Generator().manual_seed(1),
                              sampler=SamplerConfig(name)).double().flatten()
    mean_se, var_se = math.sqrt(S2 / n), S2 * math.sqrt(2 / (n - 1))
    assert abs(float(x.mean()) - MU) < 3.5 * mean_se
    assert abs(float(x.var()) - S2) < 3.5 * var_se


def test_ddim_eta_one_is_the_ancestral_sampler():
    # Same noise draws: the same samples (eq. 12 with eta = 1 is q(z_s | z_t, x_hat); see ddim_step).
    m = gaussian_vdm(-6.0, 8.0)
    a = m.sample(64, num_steps=12, generator=torch.Generator().manual_seed(3))
    b = m.sample(64, num_steps=12, generator=torch.Generator().manual_seed(3), sampler=SamplerConfig("ddim", eta=1.0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # In distribution, with independent noise, at few steps (where ancestral sampling is not yet
    # exact: its variance is below S2): the two sample sets agree within their standard errors.
    n = 6000
    xa = m.sample(n, num_steps=4, generator=torch.Generator().manual_seed(4)).double()
    xb = m.sample(n, num_steps=4, generator=torch.Generator().manual_seed(5),
                  sampler=SamplerConfig("ddim", eta=1.0)).double()
    va, vb = float(xa.var()), float(xb.var())
    assert abs(float(xa.mean() - xb.mean())) < 3.5 * math.sqrt((va + vb) / n)
    assert abs(va - vb) < 3.5 * math.sqrt(2 / (n - 1)) * math.hypot(va, vb)
    assert va < S2 - 5 * S2 * math.sqrt(2 / (n - 1))  # the few-step deficit is real, so the check has teeth


def ancestral_law(num_steps: int, g0: float, g1: float) -> tuple[float, float]:
    """Mean and variance of x after ``num_steps`` ancestral steps (uniform in gamma from g1 to g0)
    from z_1 ~ N(0, 1) and the Gaussian decoder, for x ~ N(MU, S2) and the exact denoiser:
    :func:`ancestral_chain_law` on the uniform grid."""
    return ancestral_chain_law([g1 + (g0 - g1) * i / num_steps for i in range(num_steps + 1)], MU, S2)


def ancestral_chain_law(gammas, mu: float, s2: float) -> tuple[float, float]:
    """Mean and variance of x after ancestral steps down ``gammas`` (decreasing, noisiest first)
    from z ~ N(0, 1) and the Gaussian decoder, for x ~ N(mu, s2) and the exact denoiser.

    Each step draws z_s ~ q(z_s | z_t, x = x_hat(z_t)) (Kingma et al. 2021 eq. 32-33):
    mean a_ts s_s^2 / s_t^2 z_t + a_s s_ts^2 / s_t^2 x_hat, variance s_ts^2 s_s^2 / s_t^2, with
    a_ts = a_t / a_s and s_ts^2 = s_t^2 - a_ts^2 s_s^2. x_hat is affine in z_t, so the chain is
    z_s = A z_t + C + sqrt(B) n and the law stays Gaussian: m <- A m + C, v <- A^2 v + B. Its
    variance falls short of the data's by O(1/num_steps): the step treats x_hat as the clean
    sample and so leaves out Var(x | z_t) (Bao et al. 2022, Analytic-DPM, sec. 3)."""
    def a2s2(g):
        return 1 / (1 + math.exp(g)), 1 / (1 + math.exp(-g))
    m, v = 0.0, 1.0
    for gt, gs_ in zip(gammas[:-1], gammas[1:]):
        (at2, st2), (as2, ss2) = a2s2(gt), a2s2(gs_)
        a_ts2 = at2 / as2
        s_ts2 = st2 - a_ts2 * ss2
        k = math.sqrt(at2) * s2 / (at2 * s2 + st2)  # x_hat = mu + k (z - a_t mu)
        c_x = math.sqrt(as2) * s_ts2 / st2
        A = math.sqrt(a_ts2) * ss2 / st2 + c_x * k
        C = c_x * (mu - k * math.sqrt(at2) * mu)
        m, v = A * m + C, A * A * v + s_ts2 * ss2 / st2
    a02, s02 = a2s2(gammas[-1])
    return m / math.sqrt(a02), v / a02 + s02 / a02


def test_ancestral_sampler_at_few_steps_has_the_closed_form_variance_deficit():
    # The power deficit of the grf2d preset's samples (docs/model_zoo.md: 12 % at 64 steps, 6 % at
    # 128 with the exact GRF denoiser) is this O(1/num_steps) property of ancestral sampling, not
    # a bug: the sampled variance at 8 steps agrees with the closed-form chain, well below S2.
    n, num_steps, g0, g1 = 20000, 8, -6.0, 8.0
    mean, var = ancestral_law(num_steps, g0, g1)
    x = gaussian_vdm(g0, g1).sample(n, num_steps=num_steps, generator=torch.Generator().manual_seed(6)).double()
    var_se = var * math.sqrt(2 / (n - 1))
    assert abs(float(x.mean()) - mean) < 3.5 * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < 3.5 * var_se
    assert var < S2 - 10 * var_se  # the deficit is resolved, so the comparison has teeth
    # and the closed form goes to the data's law as the steps grow (the decoder's blur aside)
    mean_many, var_many = ancestral_law(4096, g0, g1)
    assert abs(mean_many - MU) < 1e-2 and abs(var_many / S2 - 1) < 1e-2


# ------------------------------------------------------------------ deterministic trajectories


@pytest.mark.parametrize("name", ["ddim", "dpm-solver"])
def test_probability_flow_samplers_are_deterministic_maps_of_the_noise(name):
    z_T = torch.randn(5, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.linspace(-6.0, 8.0, 17, dtype=torch.float64)
    a = samplers.run_sampler(name, exact_eps, z_T.clone(), g, _no_noise, eta=0.0)
    b = samplers.run_sampler(name, exact_eps, z_T.clone(), g, _no_noise, eta=0.0)
    assert torch.equal(a, b)
    # while DDIM with eta > 0 draws noise and lands elsewhere
    draws = iter(torch.randn(16, 5, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    c = samplers.run_sampler("ddim", exact_eps, z_T.clone(), g, lambda: next(draws), eta=0.5)
    assert not torch.allclose(c, samplers.run_sampler("ddim", exact_eps, z_T.clone(), g, _no_noise, eta=0.0))
    # through the module: equal samples for equal seeds, whatever the decoder drew afterwards
    m = gaussian_vdm(-6.0, 8.0)
    s1 = m.sample(8, num_steps=16, generator=torch.Generator().manual_seed(9), sampler=SamplerConfig(name))
    s2 = m.sample(8, num_steps=16, generator=torch.Generator().manual_seed(9), sampler=SamplerConfig(name))
    assert torch.equal(s1, s2)


def _flow_errors(name: str, steps: list[int], g0: float, g1: float) -> list[float]:
    z_T = torch.tensor([[-1.5], [0.3], [1.2]], dtype=torch.float64)
    ref = exact_flow(z_T, g0, g1)
    out = []
    for n in steps:
        g = torch.linspace(g0, g1, n + 1, dtype=torch.float64)
        out.append(float((samplers.run_sampler(name, exact_eps, z_T.clone(), g, _no_noise) - ref).abs().max()))
    return out


def test_dpm_solver_is_second_order_and_ddim_first_order():
    # The error of one deterministic trajectory against the exact flow: halving the step divides
    # it by ~2 for DDIM (first order) and ~4 for DPM-Solver++(2M) (second order, Lu et al. 2022).
    steps = [16, 32, 64, 128]
    ddim, dpm = _flow_errors("ddim", steps, -10.0, 6.0), _flow_errors("dpm-solver", steps, -10.0, 6.0)
    ddim_ratio = [a / b for a, b in zip(ddim, ddim[1:])]
    dpm_ratio = [a / b for a, b in zip(dpm, dpm[1:])]
    assert all(1.7 < r < 2.3 for r in ddim_ratio), ddim_ratio
    assert all(3.4 < r < 4.6 for r in dpm_ratio[1:]), dpm_ratio
    assert all(d < e for d, e in zip(dpm, ddim))
    # The exact flow is also what a very fine grid converges to (the reference is the ODE's).
    fine = _flow_errors("dpm-solver", [4096], -10.0, 6.0)[0]
    assert fine < 1e-6


def test_logsnr_grid_is_uniform_in_lambda_and_the_default_grid_uniform_in_time():
    m = VDM(VDMConfig(num_timesteps=0, schedule="cosine", gamma_min=-6.0, gamma_max=6.0, architecture="mlp",
                      mlp_hidden=8, mlp_layers=1, emb_dim=8), DataMeta(sample_shape=(1,), data_kind="continuous"))
    g = m.sample_gammas(8, "cpu", "logsnr")
    torch.testing.assert_close(g, torch.linspace(-6.0, 6.0, 9))
    t = m.sample_gammas(8, "cpu", "time")
    torch.testing.assert_close(t, m.schedule(torch.linspace(0.0, 1.0, 9))[0])
    assert not torch.allclose(g, t)  # a cosine schedule is not linear in t


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("cfg,match", [
    (SamplerConfig("euler"), "unknown sampler 'euler'; allowed: ancestral, ddim, dpm-solver"),
    (SamplerConfig("ddim", eta=1.5), r"--eta must be in \[0, 1\]"),
    (SamplerConfig("ddim", eta=-0.1), r"--eta must be in \[0, 1\]"),
    (SamplerConfig("dpm-solver", eta=0.5), "--eta applies to --sampler ddim only"),
    (SamplerConfig("ddim", spacing="karras"), "unknown grid spacing 'karras'; allowed: time, logsnr"),
])
def test_bad_sampler_options_are_named(cfg, match):
    with pytest.raises(ConfigError, match=match):
        gaussian_vdm().check_sample_options(8, cfg)


def test_bad_step_counts_and_grids_are_named():
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        gaussian_vdm().check_sample_options(0, SamplerConfig("ddim"))
    with pytest.raises(ValueError, match="num_steps must be >= 1, got -3"):
        gaussian_vdm().check_sample_options(-3, None)
    discrete = gaussian_vdm(-6.0, 8.0, T=10)
    with pytest.raises(ValueError, match="num_steps must be in 1..9"):
        discrete.check_sample_options(16, SamplerConfig("dpm-solver"))
    with pytest.raises(ValueError, match="--grid logsnr needs a continuous-time VDM"):
        discrete.check_sample_options(4, SamplerConfig("dpm-solver", spacing="logsnr"))
    # a discrete-time model runs every sampler on its own latents' noise levels
    for name in ("ancestral", "ddim", "dpm-solver"):
        assert discrete.sample(3, num_steps=4, sampler=SamplerConfig(name)).shape == (3, 1)
