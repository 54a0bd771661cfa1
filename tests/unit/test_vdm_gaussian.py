"""VDM on Gaussian data, where every expectation has a closed form.

Data x_0 ~ N(0, s2) in one dimension; the reverse model uses the data's optimal linear
denoiser x_hat(x_t) = c_t x_t. The whole model is linear-Gaussian, so the exact NLL, the
exact ELBO and each of its decompositions are computed below in float64 from the joint
covariance of the forward chain (Luo 2022 notation: alpha_t, abar_t; eq. 45 and 58).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import integrate

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import StepContext
from pipeline.eval.elbo import exact_elbo
from pipeline.objectives.vdm import VDM, VDMConfig
from tests.unit.skips import train_skip_over_ranks

S2 = 0.5  # data variance
G_MIN, G_MAX = -4.0, 3.0


def c_opt(abar):
    """E[x_0 | x_t] = c x_t for x_0 ~ N(0, S2)."""
    return np.sqrt(abar) * S2 / (abar * S2 + 1 - abar)


class OptimalDenoiser(nn.Module):
    """eps_hat(z, gamma) of the optimal linear denoiser (test fake with a dummy parameter)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z, gamma, label=None):
        g = gamma.reshape(gamma.shape + (1,) * (z.dim() - gamma.dim())) if gamma.dim() else gamma
        abar = torch.sigmoid(-g.double())
        c = torch.sqrt(abar) * S2 / (abar * S2 + 1 - abar)
        zd = z.double()
        return ((zd - torch.sqrt(abar) * c * zd) / torch.sqrt(1 - abar)).to(z.dtype) + 0 * self.dummy


def gaussian_vdm(T, schedule="linear", form="denoising_matching", denoiser=None, **kw) -> VDM:
    cfg = VDMConfig(
        num_timesteps=T, schedule=schedule, gamma_min=G_MIN, gamma_max=G_MAX, diffusion_form=form,
        timestep_sampler="uniform", architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8, **kw,
    )
    return VDM(cfg, DataMeta(sample_shape=(1,), data_kind="continuous"), denoiser=denoiser)


# ---------------------------------------------------------------- closed-form reference


class Chain:
    """Forward chain q(x_1..x_T | x_0) for a scalar x_0, and the linear-Gaussian model."""

    def __init__(self, T, x0):
        tau = np.arange(T) / (T - 1)
        gam = G_MIN + (G_MAX - G_MIN) * tau
        self.T, self.x0 = T, x0
        self.abar = 1 / (1 + np.exp(gam))  # index t - 1
        self.alpha = self.abar / np.concatenate([[1.0], self.abar[:-1]])
        self.m = np.sqrt(self.abar) * x0
        C = np.zeros((T, T))
        for i in range(T):
            for j in range(i, T):
                C[i, j] = C[j, i] = np.sqrt(self.abar[j] / self.abar[i]) * (1 - self.abar[i])
        self.C = C

    def e_sq(self, w, d=0.0):
        """E[(w . X + d)^2] under the forward chain."""
        w = np.asarray(w, dtype=float)
        return (w @ self.m + d) ** 2 + w @ self.C @ w

    def unit(self, t, k=1.0):
        w = np.zeros(self.T)
        if t >= 1:
            w[t - 1] = k
        return w

    def e_logn(self, w, d, v):
        """E[log N(0; w . X + d, v)] (write a - b as w . X + d)."""
        return -0.5 * np.log(2 * np.pi * v) - self.e_sq(w, d) / (2 * v)

    def reverse(self, t):
        """p(x_{t-1} | x_t) = N(A x_t, v), t >= 2 (Luo eq. 84-85 with x_hat = c x_t)."""
        ab_t, ab_s, a_t = self.abar[t - 1], self.abar[t - 2], self.alpha[t - 1]
        A = (np.sqrt(a_t) * (1 - ab_s) + np.sqrt(ab_s) * (1 - a_t) * c_opt(ab_t)) / (1 - ab_t)
        return A, (1 - a_t) * (1 - ab_s) / (1 - ab_t)

    def recon(self):
        ab = self.abar[0]  # p(x_0 | x_1) = N(x_1 / sqrt(ab), (1 - ab) / ab)
        return -self.e_logn(self.unit(1, -1 / np.sqrt(ab)), self.x0, (1 - ab) / ab)

    def true_negelbo(self):
        """-E_q[log p(x_0:T) - log q(x_1:T | x_0)], term by term from the joint."""
        T, x0 = self.T, self.x0
        total = self.recon() - self.e_logn(self.unit(T), 0.0, 1.0)
        for t in range(2, T + 1):
            A, v = self.reverse(t)
            total -= self.e_logn(self.unit(t - 1) - self.unit(t, A), 0.0, v)
        for t in range(1, T + 1):  # + E log q(x_t | x_{t-1})
            a = self.alpha[t - 1]
            prev = self.unit(t - 1, -np.sqrt(a)) if t >= 2 else np.zeros(T)
            total += self.e_logn(self.unit(t) + prev, -np.sqrt(a) * x0 if t == 1 else 0.0, 1 - a)
        return total

    def denoising_terms(self):
        """Luo eq. 58: prior KL(q(x_T|x_0)||N(0,1)) and E KL(q(x_{t-1}|x_t,x_0)||p), t = 2..T."""
        ab_T = self.abar[-1]
        prior = 0.5 * (1 - ab_T + ab_T * self.x0**2 - 1 - np.log(1 - ab_T))
        terms = []
        for t in range(2, self.T + 1):
            ab_t, ab_s, a_t = self.abar[t - 1], self.abar[t - 2], self.alpha[t - 1]
            var_q = (1 - a_t) * (1 - ab_s) / (1 - ab_t)
            k = np.sqrt(ab_s) * (1 - a_t) / (1 - ab_t)  # mu_q - mu_p = k (x_0 - c x_t)
            terms.append(k**2 * self.e_sq(self.unit(t, -c_opt(ab_t)), self.x0) / (2 * var_q))
        return prior, np.array(terms)

    def consistency_terms(self, joint=True):
        """Luo eq. 45: prior E KL(q(x_T|x_{T-1})||N(0,1)) and the terms t = 1..T-1.

        joint=True: E over the joint chain of log q(x_t|x_{t-1}) - log p(x_t|x_{t+1}) (exact).
        joint=False: Luo's written E_{q(x_{t-1},x_{t+1}|x_0)} KL(q(x_t|x_{t-1}) || p(x_t|x_{t+1})).
        """
        T, x0 = self.T, self.x0
        a_T = self.alpha[-1]
        ex2 = self.e_sq(self.unit(T - 1), 0.0 if T > 1 else x0)
        prior = 0.5 * (1 - a_T + a_T * ex2 - 1 - np.log(1 - a_T))
        terms = []
        for t in range(1, T):
            a = self.alpha[t - 1]
            A, v_p = self.reverse(t + 1)
            prev_w = self.unit(t - 1, np.sqrt(a)) if t >= 2 else np.zeros(T)
            prev_d = np.sqrt(a) * x0 if t == 1 else 0.0
            if joint:
                e_logq = -0.5 * np.log(2 * np.pi * np.e * (1 - a))
                e_logp = self.e_logn(self.unit(t) - self.unit(t + 1, A), 0.0, v_p)
                terms.append(e_logq - e_logp)
            else:
                # KL(N(mq, vq) || N(mp, vp)) with mq - mp = sqrt(a) x_{t-1} - A x_{t+1}.
                diff_sq = self.e_sq(prev_w - self.unit(t + 1, A), prev_d)
                terms.append(0.5 * (np.log(v_p / (1 - a)) + ((1 - a) + diff_sq) / v_p - 1))
        return prior, np.array(terms)

    def marginal_var(self):
        """Variance of x_0 under the model: push N(0,1) down the reverse chain and decode."""
        V = 1.0
        for t in range(self.T, 1, -1):
            A, v = self.reverse(t)
            V = A**2 * V + v
        ab = self.abar[0]
        return V / ab + (1 - ab) / ab

    def exact_nll(self):
        """-log p(x_0) of the linear-Gaussian model: push N(0,1) down the reverse chain."""
        V = 1.0
        for t in range(self.T, 1, -1):
            A, v = self.reverse(t)
            V = A**2 * V + v
        ab = self.abar[0]
        Vx = V / ab + (1 - ab) / ab
        return 0.5 * np.log(2 * np.pi * Vx) + self.x0**2 / (2 * Vx)


def continuous_negelbo(x0):
    """recon + prior + 0.5 int e^{-gamma} E(x_0 - x_hat)^2 dgamma (Kingma et al. eq. 17 in gamma)."""
    ab0, ab1 = 1 / (1 + np.exp(G_MIN)), 1 / (1 + np.exp(G_MAX))
    recon = 0.5 * np.log(2 * np.pi * (1 - ab0) / ab0) + 0.5  # E of the Gaussian decoder's NLL
    prior = 0.5 * (1 - ab1 + ab1 * x0**2 - 1 - np.log(1 - ab1))

    def integrand(g):
        ab = 1 / (1 + np.exp(g))
        c = c_opt(ab)
        return 0.5 * np.exp(-g) * ((x0 - c * np.sqrt(ab) * x0) ** 2 + c**2 * (1 - ab))

    diff, _ = integrate.quad(integrand, G_MIN, G_MAX, epsabs=1e-12, epsrel=1e-12)
    return recon + prior + diff


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("x0", [-1.3, 0.2, 2.0])
def test_decompositions_and_which_consistency_estimator_is_exact(x0):
    ch = Chain(6, x0)
    truth = ch.true_negelbo()
    prior_b, terms_b = ch.denoising_terms()
    form_b = ch.recon() + prior_b + terms_b.sum()
    prior_a, terms_a = ch.consistency_terms(joint=True)
    form_a = ch.recon() + prior_a + terms_a.sum()
    _, terms_luo = ch.consistency_terms(joint=False)
    luo_written = ch.recon() + prior_a + terms_luo.sum()
    assert abs(form_b - truth) < 1e-9
    assert abs(form_a - truth) < 1e-9
    # Luo eq. 45 as written (x_t independent of x_{t+1} given x_{t-1}) is not the ELBO.
    assert abs(luo_written - truth) > 0.05, (luo_written, truth)


@pytest.mark.parametrize("form", ["denoising_matching", "consistency"])
def test_module_terms_match_closed_form_per_term(form):
    T, x0, n = 6, 0.7, 40000
    m = gaussian_vdm(T, form=form, denoiser=OptimalDenoiser())
    ch = Chain(T, x0)
    prior_ref, terms_ref = ch.denoising_terms() if form == "denoising_matching" else ch.consistency_terms()
    K = T - 1
    x = torch.full((n, 1), x0)
    torch.manual_seed(0)
    with torch.no_grad():
        out = m({"x": x}, StepContext(0, 0, 1, 0, 1))
        assert abs(float(out.loss_prior) * math.log(2) - prior_ref) < 1e-5
        for k in range(K):
            u = torch.full((n,), (k + 0.5) / K)
            vals = m.diffusion_nats(x, u, None)[0].double() / K
            se = float(vals.std()) / math.sqrt(n)
            assert abs(float(vals.mean()) - terms_ref[k]) < 4 * se + 1e-6, (k, float(vals.mean()), terms_ref[k], se)
        rec = m.recon_nats(x, x, m.endpoints("cpu")[0], torch.randn_like(x)).double()
        assert abs(float(rec.mean()) - ch.recon()) < 4 * float(rec.std()) / math.sqrt(n)


def test_elbo_is_never_below_nll_and_gap_shrinks_with_T():
    Ts = (2, 3, 5, 9, 17, 65)  # nested grids: tau = (t - 1) / (T - 1)
    for x0 in (-2.0, -0.3, 0.0, 1.1):  # pointwise: the bound holds for every x_0
        for T in Ts:
            ch = Chain(T, x0)
            assert ch.true_negelbo() >= ch.exact_nll() - 1e-9, (T, x0)
        assert continuous_negelbo(x0) >= Chain(1025, x0).exact_nll() - 1e-6
    # In expectation over the data (every quantity is quadratic in x_0, so the mean over
    # x_0 ~ N(0, S2) is exactly the mean of the values at +-sqrt(S2)) the bound tightens
    # with T (Kingma et al. 2021 sec. 4.1: refining the grid never hurts an optimal
    # denoiser). Pointwise it need not: at x_0 = 0 the noisiest prediction is the best.
    pts = (math.sqrt(S2), -math.sqrt(S2))
    elbos = [np.mean([Chain(T, x0).true_negelbo() for x0 in pts]) for T in Ts]
    gaps = [e - np.mean([Chain(T, x0).exact_nll() for x0 in pts]) for T, e in zip(Ts, elbos)]
    assert all(b < a for a, b in zip(elbos, elbos[1:])), elbos
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
    assert np.mean([continuous_negelbo(x0) for x0 in pts]) < elbos[-1]


@pytest.mark.parametrize("T", [5, 0])
def test_exact_elbo_of_module_matches_closed_form(T):
    x = torch.tensor([[-1.5], [0.3], [1.0]])
    m = gaussian_vdm(T, denoiser=OptimalDenoiser())
    r = exact_elbo(m, x, num_noise_samples=4000, num_quadrature_points=48, generator=torch.Generator().manual_seed(0))
    ref = np.mean([Chain(T, float(v)).true_negelbo() if T else continuous_negelbo(float(v)) for v in x[:, 0]])
    ref_bpd = ref / math.log(2)
    assert abs(r["bits_per_dim"] - ref_bpd) < 4 * r["stderr_bpd"] + 1e-4, (r["bits_per_dim"], ref_bpd, r["stderr_bpd"])


def _mean_loss(m, x, num_draws, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        outs = [m({"x": x}, StepContext(i, 0, 1, 0, 1)) for i in range(num_draws)]
    per = torch.cat([(o.diff_per_sample * o.weight) for o in outs]).double()
    return float(torch.stack([o.loss for o in outs]).mean()), float(per.std()) / math.sqrt(len(per)), outs


def test_continuous_time_loss_depends_on_schedule_only_through_endpoints():
    torch.manual_seed(0)
    x = torch.randn(4000, 1) * math.sqrt(S2)
    results = {}
    ref = None
    for sched in ("linear", "cosine", "learned"):
        m = gaussian_vdm(0, schedule=sched)
        if ref is None:
            with torch.no_grad():
                for p in m.denoiser.parameters():
                    p.normal_(0, 0.5)
            ref = m.denoiser.state_dict()
        m.denoiser.load_state_dict(ref)  # the same gamma-conditioned network
        results[sched] = _mean_loss(m, x, 5, seed=1)[:2]
    (l_lin, se_lin) = results["linear"]
    for sched in ("cosine", "learned"):
        l, se = results[sched]
        assert abs(l - l_lin) < 4 * math.hypot(se, se_lin), (sched, l, l_lin, se, se_lin)
    # And a different endpoint changes it (the test can fail).
    m2 = VDM(VDMConfig(num_timesteps=0, gamma_min=G_MIN, gamma_max=G_MAX + 3, timestep_sampler="uniform",
                       architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8),
             DataMeta(sample_shape=(1,), data_kind="continuous"))
    m2.denoiser.load_state_dict(ref)
    l2, se2 = _mean_loss(m2, x, 5, seed=1)[:2]
    assert abs(l2 - l_lin) > 4 * math.hypot(se2, se_lin)


def test_both_forms_give_the_same_total_elbo_in_expectation():
    torch.manual_seed(0)
    T = 8
    x = torch.randn(20000, 1) * math.sqrt(S2)
    ms = {f: gaussian_vdm(T, form=f) for f in ("denoising_matching", "consistency")}
    with torch.no_grad():
        for p in ms["denoising_matching"].denoiser.parameters():
            p.normal_(0, 0.5)
    ms["consistency"].denoiser.load_state_dict(ms["denoising_matching"].denoiser.state_dict())
    res = {}
    for f, m in ms.items():
        torch.manual_seed(2)
        with torch.no_grad():
            out = m({"x": x}, StepContext(0, 0, 1, 0, 1))
        recon_prior = float(out.loss_recon + out.loss_prior)
        per = out.diff_per_sample.double()
        res[f] = (recon_prior + float(per.mean()), float(per.std()) / math.sqrt(len(per)))
    (a, sa), (b, sb) = res["consistency"], res["denoising_matching"]
    # Same seed: the reconstruction noise (first draw) is shared, the prior terms are exact.
    assert abs(a - b) < 4 * math.hypot(sa, sb), res
    assert sa > sb  # the consistency estimator is the noisier one


@pytest.mark.parametrize("num_steps,T_ref", [(8, 9), (4, 5)])
def test_ancestral_sampling_draws_from_the_model(num_steps, T_ref):
    # The T = 9 model sampled with all 8 steps is the T = 9 chain; with 4 steps it visits
    # every other grid point, i.e. it is the T = 5 chain. Samples are N(0, V) exactly.
    m = gaussian_vdm(9, denoiser=OptimalDenoiser())
    n = 40000
    x = m.sample(n, num_steps=num_steps, generator=torch.Generator().manual_seed(0)).double()
    V = Chain(T_ref, 0.0).marginal_var()
    assert abs(float(x.mean())) < 4 * math.sqrt(V / n)
    assert abs(float(x.var()) - V) < 4 * V * math.sqrt(2 / n), (float(x.var()), V)
    assert abs(Chain(9, 0.0).marginal_var() - Chain(5, 0.0).marginal_var()) > 8 * V * math.sqrt(2 / n)


def test_gaussian_skip_is_the_regression_of_eps_on_z_and_its_moments_are_gathered_over_ranks():
    """vdm.skip=gaussian: eps_hat = sigma (z - alpha mu) / (alpha^2 v + sigma^2) + net, mu and v the
    data's moments over everything trained on. The MLP's output layer starts at zero, so the
    untrained denoiser is the skip alone, which must be E[eps | z] for independent Gaussian values
    of those moments: checked against the least-squares fit eps ~ a z + b per value over draws."""
    meta = DataMeta(sample_shape=(3,), data_kind="continuous")
    cfg = VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=4, mlp_layers=1, emb_dim=8, skip="gaussian")
    mean, std = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([0.1, 1.0, 3.0])
    g = torch.Generator().manual_seed(0)
    batches = [mean + std * torch.randn(64, 3, generator=g) for _ in range(4)]

    mu0, var0 = VDM(cfg, meta).denoiser.skip.moments()  # before any data: unit Gaussian
    assert mu0.abs().max() == 0 and bool((var0 == 1).all())
    one = train_skip_over_ranks(VDM(cfg, meta), [[b] for b in batches])
    two = train_skip_over_ranks(VDM(cfg, meta), [[b[:32], b[32:]] for b in batches])
    data = torch.cat(batches).double()
    for m in (one, two):
        mu, var = m.denoiser.skip.moments()
        torch.testing.assert_close(mu, data.mean(0))
        torch.testing.assert_close(var, data.var(0, unbiased=False))
    for gamma in (-3.0, 0.0, 4.0):
        alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
        mu, var = (v.float() for v in one.denoiser.skip.moments())
        x = mu + var.sqrt() * torch.randn(200_000, 3, generator=g)
        eps = torch.randn(x.shape, generator=g)
        z = alpha * x + sigma * eps
        zc, ec = z - z.mean(0), eps - eps.mean(0)
        slope = (zc * ec).sum(0) / (zc * zc).sum(0)
        intercept = eps.mean(0) - slope * z.mean(0)
        zq = z[:5]
        with torch.no_grad():
            got = one.denoiser(zq, torch.tensor(gamma))
        torch.testing.assert_close(got, slope * zq + intercept, rtol=0.03, atol=0.02)
    plain = VDM(VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=4, mlp_layers=1, emb_dim=8), meta)
    with torch.no_grad():
        assert float(plain.denoiser(zq, torch.tensor(0.0)).abs().max()) == 0.0  # without the skip: 0
