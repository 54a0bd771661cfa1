"""vdm.skip=sparse: the exact denoiser of independent values that are each empty (a point mass at
the model-space image of 0) or Gaussian, checked against the posterior mean by quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from pipeline.config import ConfigError
from pipeline.data.meta import DataMeta
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm.denoiser import GaussianSkip, SparseSkip
from tests.unit.skips import train_skip_over_ranks


def _cfg(**kw) -> VDMConfig:
    # The MLP's output layer starts at zero: the untrained denoiser is the skip alone.
    return VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=4, mlp_layers=1, emb_dim=8, skip="sparse", **kw)


def _sparse_batches(num_batches: int, seed: int) -> list[torch.Tensor]:
    """Three values: empty 30 %, 90 % and never; non-empty ones Gaussian of different moments."""
    g = torch.Generator().manual_seed(seed)
    mean, std, p_empty = torch.tensor([0.5, -2.0, 1.0]), torch.tensor([0.1, 1.0, 3.0]), torch.tensor([0.3, 0.9, 0.0])
    out = []
    for _ in range(num_batches):
        x = mean + std * torch.randn(64, 3, generator=g)
        out.append(torch.where(torch.rand(64, 3, generator=g) < p_empty, 0.0, x))
    return out


def _posterior_eps(z: float, gamma: float, pi: float, mu: float, var: float, atom: float) -> float:
    """E[eps | z] = (z - alpha E[x | z]) / sigma, E[x | z] by quadrature over the Gaussian part."""
    a2, s2 = 1 / (1 + math.exp(gamma)), 1 / (1 + math.exp(-gamma))
    alpha, sigma = math.sqrt(a2), math.sqrt(s2)

    def lik(x):  # p(z | x)
        return math.exp(-0.5 * (z - alpha * x) ** 2 / s2) / math.sqrt(2 * math.pi * s2)

    def prior(x):
        return math.exp(-0.5 * (x - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)

    lo, hi = mu - 12 * math.sqrt(var), mu + 12 * math.sqrt(var)
    pts = [min(max(z / alpha, lo), hi)]  # the likelihood's peak, for a sharp one
    w_full = integrate.quad(lambda x: prior(x) * lik(x), lo, hi, points=pts, limit=200, epsabs=0)[0]
    m_full = integrate.quad(lambda x: x * prior(x) * lik(x), lo, hi, points=pts, limit=200, epsabs=0)[0]
    w_empty = lik(atom)
    x_mean = (pi * atom * w_empty + (1 - pi) * m_full) / (pi * w_empty + (1 - pi) * w_full)
    return (z - alpha * x_mean) / sigma


def test_sparse_skip_moments_are_those_of_the_empty_and_non_empty_values_gathered_over_ranks():
    meta = DataMeta(sample_shape=(3,), data_kind="continuous")
    batches = _sparse_batches(4, seed=0)
    pi0, mu0, var0 = VDM(_cfg(), meta).denoiser.skip.moments()  # before any data: GaussianSkip's start
    assert pi0.abs().max() == 0 and mu0.abs().max() == 0 and bool((var0 == 1).all())
    one = train_skip_over_ranks(VDM(_cfg(), meta), [[b] for b in batches])
    two = train_skip_over_ranks(VDM(_cfg(), meta), [[b[:40], b[40:]] for b in batches])
    data = torch.cat(batches).double().numpy()
    empty = data == 0
    want_pi = empty.mean(0)
    want_mu = np.array([data[~empty[:, j], j].mean() for j in range(3)])
    want_var = np.array([data[~empty[:, j], j].var() for j in range(3)])
    assert 0.2 < want_pi[0] < 0.4 and want_pi[1] > 0.8 and want_pi[2] == 0  # the data has what it claims
    for m in (one, two):
        pi, mu, var = (t.numpy() for t in m.denoiser.skip.moments())
        np.testing.assert_allclose(pi, want_pi, rtol=1e-12)
        np.testing.assert_allclose(mu, want_mu, rtol=1e-10)
        np.testing.assert_allclose(var, want_var, rtol=1e-8)


@pytest.mark.parametrize("gamma", [-6.0, -1.0, 2.0, 5.0])
def test_sparse_skip_is_the_posterior_mean_of_eps_by_quadrature(gamma):
    """The untrained denoiser (the skip alone) against E[eps | z] computed by quadrature, at z
    near the empty value, near the non-empty mode, between them and far out."""
    meta = DataMeta(sample_shape=(3,), data_kind="continuous")
    m = train_skip_over_ranks(VDM(_cfg(), meta), [[b] for b in _sparse_batches(4, seed=1)])
    pi, mu, var = (t.tolist() for t in m.denoiser.skip.moments())
    alpha = math.sqrt(1 / (1 + math.exp(gamma)))
    sigma = math.sqrt(1 / (1 + math.exp(-gamma)))
    rows = []
    for k in (-3.0, -0.5, 0.0, 0.7, 2.5):  # z = alpha x + k sigma at x = 0 (empty) and x = mu
        rows.append([k * sigma, alpha * mu[1] + k * sigma, alpha * mu[2] + k * sigma])
        rows.append([alpha * mu[0] + k * sigma, 0.5 * alpha * mu[1] + k * sigma, k * sigma])
    z = torch.tensor(rows, dtype=torch.float64)
    with torch.no_grad():
        got = m.denoiser.skip(z, torch.tensor(gamma, dtype=torch.float64))
        # ... and it is what the denoiser outputs (in float32, the network's dtype)
        torch.testing.assert_close(m.denoiser(z.float(), torch.tensor(gamma)), got.float(), rtol=1e-4, atol=1e-4)
    want = torch.tensor([[_posterior_eps(float(z[i, j]), gamma, pi[j], mu[j], var[j], 0.0) for j in range(3)]
                         for i in range(z.shape[0])], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sparse_skip_without_empty_values_is_the_gaussian_skip_and_with_only_empty_ones_denoises_to_it():
    skip, gauss = SparseSkip((2,), atom=-1.0), GaussianSkip((2,))
    x = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.2
    skip.add(skip.batch_sums(x), torch.tensor(100.0))
    gauss.add(gauss.batch_sums(x), torch.tensor(100.0))
    z = torch.randn(7, 2, dtype=torch.float64)
    for gamma in (-5.0, 0.0, 3.0):
        g = torch.tensor(gamma, dtype=torch.float64)
        torch.testing.assert_close(skip(z, g), gauss(z, g), rtol=1e-12, atol=1e-12)
    only = SparseSkip((2,), atom=-1.0)
    only.add(only.batch_sums(torch.full((10, 2), -1.0)), torch.tensor(10.0))
    g = torch.tensor(1.0, dtype=torch.float64)
    alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    torch.testing.assert_close(only(z, g), (z + alpha) / sigma)  # x = -1 surely: eps = (z - alpha x) / sigma
    assert bool(torch.isfinite(only(z * 1e3, g)).all())


def test_sparse_skip_empty_value_is_the_transform_image_of_zero():
    """Under log-label-fraction a stored 0 is -1 in model space, whatever the label: the skip
    counts exactly the zeros of the stored showers as empty."""
    meta = DataMeta(sample_shape=(4,), data_kind="continuous", label_kind="continuous", label_range=(1.0, 100.0))
    m = VDM(_cfg(data_transform="log-label-fraction"), meta)
    assert m.denoiser.skip.atom == -1.0
    g = torch.Generator().manual_seed(3)
    x = torch.rand(32, 4, generator=g) * torch.where(torch.rand(32, 4, generator=g) < 0.6, 0.0, 1.0)
    y = torch.exp(torch.rand(32, generator=g) * math.log(100.0))
    train_skip_over_ranks(m, [[{"x": x, "label": y}]])
    pi, _, _ = m.denoiser.skip.moments()
    torch.testing.assert_close(pi, (x == 0).double().mean(0))


def test_sparse_skip_refuses_discrete_data():
    meta = DataMeta(sample_shape=(1, 4, 4), data_kind="spins")
    with pytest.raises(ConfigError, match=r"vdm.skip=sparse .* data_kind 'spins'.*vdm.skip=gaussian"):
        VDM(VDMConfig(num_timesteps=0, skip="sparse"), meta)
