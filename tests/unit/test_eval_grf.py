"""GRF evaluation, and the exact-denoiser check of the VDM's ELBO.

For a Gaussian field the optimal eps-prediction is a linear filter diagonal in Fourier
space (``ExactGRFDenoiser``), and the VDM's negative ELBO with it has a closed form mode by
mode (``elbo_gap_nats``). Each piece is checked independently:
 - the filter against the dense posterior mean E[eps | z] = sigma (alpha^2 C + sigma^2 I)^-1 z
   built from the field's dense covariance (no Fourier transform);
 - the closed form against a dense calculation (trace of the dense posterior variance,
   integrated over gamma by adaptive quadrature; log det of the dense covariance);
 - the VDM's own ELBO code (training estimator with uniform time, and the exact evaluator
   that ``pipeline evaluate`` uses) with the exact denoiser against the closed form, within
   a few standard errors of the Monte Carlo, and >= the exact NLL;
 - a denoiser for the wrong spectrum gives a larger ELBO, resolved by the same estimator
   (the comparison can fail).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from pipeline.data.meta import DataMeta
from pipeline.eval.grf import (ExactGRFDenoiser, compare_with_exact_nll, elbo_gap_nats, evaluate_grf,
                               field_power)
from pipeline.eval.likelihood import vdm_bits_per_dim
from pipeline.eval.elbo import exact_elbo
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.physics.grf import GRF, PowerLaw


def field(ndim=2, size=8, n=-2.0, amplitude=1.8, channels=1) -> GRF:
    return GRF(ndim, size, PowerLaw(n, amplitude=amplitude), channels=channels)


def exact_vdm(f: GRF, g0: float, g1: float, denoiser_field: GRF | None = None) -> VDM:
    cfg = VDMConfig(num_timesteps=0, schedule="linear", gamma_min=g0, gamma_max=g1, timestep_sampler="uniform",
                    architecture="mlp", mlp_hidden=8, mlp_layers=1, emb_dim=8)
    return VDM(cfg, DataMeta(sample_shape=f.shape, data_kind="continuous"),
               denoiser=ExactGRFDenoiser(denoiser_field or f))


# ------------------------------------------------------------------ the pieces, densely


@pytest.mark.parametrize("ndim,size", [(1, 8), (1, 7), (2, 4), (2, 5)])
@pytest.mark.parametrize("gamma", [-3.0, 0.5, 4.0])
def test_exact_denoiser_is_the_dense_posterior_mean(ndim, size, gamma):
    f = field(ndim, size)
    C = f.covariance()
    a2, s2 = 1 / (1 + math.exp(gamma)), 1 / (1 + math.exp(-gamma))
    z = np.random.default_rng(0).standard_normal((3, f.num_sites))
    dense = math.sqrt(s2) * np.linalg.solve(a2 * C + s2 * np.eye(f.num_sites), z.T).T
    zt = torch.from_numpy(z).reshape(3, *f.shape)
    got = ExactGRFDenoiser(f)(zt, torch.full((3,), gamma, dtype=torch.float64)).reshape(3, -1)
    np.testing.assert_allclose(got.detach().numpy(), dense, rtol=1e-9, atol=1e-12)
    got_scalar = ExactGRFDenoiser(f)(zt, torch.tensor(gamma, dtype=torch.float64)).reshape(3, -1)
    np.testing.assert_allclose(got_scalar.detach().numpy(), dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ndim,size,g0,g1", [(1, 8, -4.0, 2.0), (1, 9, -13.3, 5.0), (2, 4, -6.0, 3.0)])
def test_closed_form_gap_matches_dense_calculation(ndim, size, g0, g1):
    f = field(ndim, size)
    C, n = f.covariance(), f.num_sites
    eye = np.eye(n)

    def post_var_trace(g):  # tr Var(eps | z_g) = tr(I - s^2 (a^2 C + s^2 I)^-1)
        a2, s2 = 1 / (1 + math.exp(g)), 1 / (1 + math.exp(-g))
        return n - s2 * np.trace(np.linalg.inv(a2 * C + s2 * eye))

    a1, s1 = 1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))
    prior = 0.5 * (n * s1 + a1 * np.trace(C) - n - n * math.log(s1))
    recon = n * 0.5 * (1 + math.log(2 * math.pi) + g0)
    diff = 0.5 * integrate.quad(post_var_trace, g0, g1, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
    nll = 0.5 * (n * math.log(2 * math.pi * math.e) + np.linalg.slogdet(C)[1])
    got = elbo_gap_nats(field_power(f), g0, g1)
    assert got["prior"] == pytest.approx(prior, rel=1e-10)
    assert got["recon"] == pytest.approx(recon, rel=1e-12)
    assert got["diffusion"] == pytest.approx(diff, rel=1e-8)
    assert got["nll"] == pytest.approx(nll, rel=1e-10)
    assert got["gap"] == pytest.approx(recon + prior + diff - nll, rel=1e-7, abs=1e-10)
    assert got["gap"] > 0  # the ELBO is a bound


def test_closed_form_gap_vanishes_with_wide_endpoints_and_sums_channels():
    f = field(2, 8)
    wide = elbo_gap_nats(field_power(f), -30.0, 30.0)
    assert abs(wide["gap"]) < 1e-8 * abs(wide["nll"]) + 1e-9
    narrow = elbo_gap_nats(field_power(f), -4.0, 2.0)
    assert narrow["gap"] > 1.0
    two = elbo_gap_nats(field_power(field(2, 8, channels=2)), -4.0, 2.0)
    assert two["gap"] == pytest.approx(2 * narrow["gap"], rel=1e-12)


# ------------------------------------------------------------ the VDM against the closed form


def _mc_gap(vdm: VDM, f: GRF, x: np.ndarray, num_repeats: int, seed: int) -> tuple[float, float, float, float]:
    """The training estimator (recon + prior + diffusion term at one time, one noise draw each)
    on ``num_repeats`` copies of each field, minus the exact NLL of that field: (mean gap, its
    stderr, mean -ELBO, its stderr), the errors from the spread of the per-field means.

    Repeat r of a field draws its time in the stratum [r, r + 1) / num_repeats (the VDM's
    stratified sampler does the same across a batch): unbiased, and it removes most of the
    spread of the integrand over t, which grows as the number of dimensions squared."""
    g = torch.Generator().manual_seed(seed)
    b = len(x)
    xt = torch.from_numpy(x).repeat(num_repeats, *(1,) * (x.ndim - 1))  # row r * b + i: field i
    u = (torch.arange(num_repeats).repeat_interleave(b) + torch.rand(b * num_repeats, generator=g)) / num_repeats
    g0, g1 = vdm.endpoints("cpu")
    with torch.no_grad():
        recon = vdm.recon_nats(xt, xt, g0, torch.randn(xt.shape, generator=g))
        prior = vdm.prior_nats(xt, g1)
        diff, *_ = vdm.diffusion_nats(xt, u, None, g)
    neg_elbo = (recon + prior + diff).double().numpy().reshape(num_repeats, b).mean(0)  # [b]
    gap = neg_elbo + f.log_density(x)
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))  # noqa: E731
    return float(gap.mean()), se(gap), float(neg_elbo.mean()), se(neg_elbo)


@pytest.mark.parametrize("ndim,size,g0,g1", [(2, 8, -4.0, 2.0), (2, 8, -13.3, 5.0), (1, 32, -4.0, 2.0),
                                              (3, 4, -4.0, 2.0)])
def test_vdm_elbo_with_exact_denoiser_matches_closed_form(ndim, size, g0, g1):
    f = field(ndim, size)
    x = f.sample(512, np.random.default_rng(1)).astype(np.float32)
    vdm = exact_vdm(f, g0, g1)
    gap, gap_se, neg_elbo, neg_elbo_se = _mc_gap(vdm, f, x, num_repeats=32, seed=2)
    closed = elbo_gap_nats(field_power(f), g0, g1)
    # The gap in expectation over fields: the sample's own NLL is subtracted field by field,
    # so only the closed form's expectation is compared (within 4 standard errors).
    assert abs(gap - closed["gap"]) < 4 * gap_se, (gap, gap_se, closed["gap"])
    nll = -float(f.log_density(x).mean())
    assert neg_elbo > nll - 3 * neg_elbo_se
    # The exact evaluator that `pipeline evaluate` runs (Gauss-Legendre in gamma), paired
    # with each field's NLL as above; and its bits/dim wrapper on the same fields.
    xs = torch.from_numpy(x[:128])
    out = exact_elbo(vdm, xs, num_noise_samples=8, generator=torch.Generator().manual_seed(3))
    per_field = out["per_sample_bpd"].double().numpy() * math.log(2) * f.num_sites + f.log_density(x[:128])
    ev_se = per_field.std(ddof=1) / math.sqrt(len(per_field))
    assert abs(per_field.mean() - closed["gap"]) < 4 * ev_se, (per_field.mean(), ev_se, closed["gap"])
    assert out["prior_bpd"] * math.log(2) * f.num_sites == pytest.approx(
        closed["prior"] - 0.5 * (1 / (1 + math.exp(g1))) * (field_power(f).sum() - (x[:128].astype(np.float64) ** 2)
                                                          .sum(tuple(range(1, x.ndim))).mean()), rel=1e-4, abs=1e-5)
    lik = vdm_bits_per_dim(vdm, xs, num_noise_samples=8, batch_size=128, seed=3)  # one batch: the same draws
    assert lik.bits_per_dim == pytest.approx(out["bits_per_dim"], rel=1e-6)


def test_narrow_schedule_gap_is_resolved_and_a_wrong_denoiser_is_detected():
    """With gamma in [-4, 2] the gap is many standard errors from 0, so matching it is not
    vacuous; a denoiser built for twice the power misses it by many standard errors."""
    f = field(2, 16)
    x = f.sample(512, np.random.default_rng(4)).astype(np.float32)
    closed = elbo_gap_nats(field_power(f), -4.0, 2.0)["gap"]
    gap, gap_se, *_ = _mc_gap(exact_vdm(f, -4.0, 2.0), f, x, num_repeats=32, seed=5)
    assert closed > 20 * gap_se and abs(gap - closed) < 4 * gap_se
    wrong = exact_vdm(f, -4.0, 2.0, denoiser_field=field(2, 16, amplitude=3.6))
    bad_gap, bad_se, *_ = _mc_gap(wrong, f, x, num_repeats=32, seed=5)
    assert bad_gap - closed > 6 * math.hypot(bad_se, gap_se)


# ------------------------------------------------------------------ spectrum and one-point


@pytest.mark.parametrize("ndim,size", [(2, 16), (1, 64), (3, 8)])
def test_evaluate_grf_true_fields_pass_and_a_wrong_amplitude_fails(ndim, size):
    f = field(ndim, size)
    rng = np.random.default_rng(6)
    good = evaluate_grf(f.sample(400, rng), f, reference=f.sample(400, rng))
    nb = good["power_spectrum_num_bins"]
    # Under the reference chi2 ~ chi^2_nb: mean nb, sd sqrt(2 nb).
    assert good["power_spectrum_chi2"] < nb + 5 * math.sqrt(2 * nb)
    assert good["power_spectrum_max_rel_err"] < 0.25 and good["ks_one_point"] < 0.05
    assert good["std_one_point"] == pytest.approx(good["std_exact"], rel=0.05)
    assert len(good["power_spectrum"]["ratio"]) == nb
    bad = evaluate_grf(1.2 * f.sample(400, rng), f)  # power 1.44 x
    assert bad["power_spectrum_chi2"] > 10 * nb
    assert bad["power_spectrum_max_rel_err"] > 0.3
    assert bad["w1_one_point"] > 5 * good["w1_one_point_reference"]


def test_compare_with_exact_nll_flags_an_elbo_below_the_bound():
    f = field(2, 8)
    x = f.sample(256, np.random.default_rng(7))
    nll = f.nll_nats_per_dim(x)
    per_field = -f.log_density(x) / f.num_sites
    se = math.hypot(0.01 * math.log(2), per_field.std(ddof=1) / math.sqrt(len(x)))  # the gap's error

    def lik(nats):
        return {"bits_per_dim": nats / math.log(2), "bits_per_dim_stderr": 0.01}

    ok, flags = compare_with_exact_nll(lik(nll + 0.05), x, f)
    assert not flags and ok["nll_exact_nats_per_dim"] == pytest.approx(nll, rel=1e-12)
    assert ok["gap_nats_per_dim"] == pytest.approx(0.05, rel=1e-9)
    assert ok["gap_nats_per_dim_stderr"] == pytest.approx(se, rel=1e-9)
    assert ok["nats_per_dim"] == pytest.approx(nll + 0.05, rel=1e-12)
    assert not compare_with_exact_nll(lik(nll - 2.5 * se), x, f)[1]  # within 3 standard errors
    _, flags = compare_with_exact_nll(lik(nll - 3.5 * se), x, f)
    assert len(flags) == 1 and "below the exact NLL" in flags[0]
