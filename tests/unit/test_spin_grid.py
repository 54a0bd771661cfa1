"""The spin-variance sampling grid (``vdm.sample_grid`` / ``--grid spin-variance``).

Its density of noise levels follows Var(x | z) of one +-1 spin; here that variance is checked
against Bayes' rule evaluated directly, the grid's equal steps of cumulative variance against
an independent quadrature, and the Gaussian-data claim of its docstring (the uniform grid is
better there, so the grid is offered for spins only) against the closed-form ancestral chain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm import samplers
from pipeline.objectives.vdm.config import SamplerConfig
from tests.unit.test_vdm_samplers import ancestral_chain_law


def bayes_posterior_variance(gamma: float, num_draws: int = 400_000, seed: int = 0) -> float:
    """Monte Carlo of E_z[Var(x | z)] for x = +-1 equally likely, z = alpha x + sigma eps, with
    the posterior from the two Gaussian likelihoods (no tanh identity)."""
    rng = np.random.default_rng(seed)
    a, s = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
    x = rng.choice([-1.0, 1.0], size=num_draws)
    z = a * x + s * rng.standard_normal(num_draws)
    log_p_plus, log_p_minus = -((z - a) ** 2) / (2 * s * s), -((z + a) ** 2) / (2 * s * s)
    p_plus = 1 / (1 + np.exp(np.clip(log_p_minus - log_p_plus, -700, 700)))
    mean = 2 * p_plus - 1
    return float(np.mean(1 - mean**2))


@pytest.mark.parametrize("gamma", [-3.0, -1.0, 0.0, 1.5, 4.0])
def test_spin_posterior_variance_is_bayes_rule(gamma):
    got = float(samplers.spin_posterior_variance(torch.tensor([gamma]))[0])
    want = bayes_posterior_variance(gamma)
    # the Monte Carlo's standard error is below 5e-4 for these draws (1 - mean^2 lies in [0, 1])
    assert abs(got - want) < 2e-3 + 1e-2 * want, (got, want)


def test_spin_posterior_variance_limits():
    v = samplers.spin_posterior_variance(torch.tensor([-12.0, 12.0]))
    assert float(v[0]) < 1e-6  # SNR e^12: every spin decided
    assert abs(float(v[1]) - 1) < 1e-4  # SNR e^-12: nothing known


def test_grid_takes_equal_steps_of_floored_cumulative_variance():
    g0, g1, n = -3.9, 6.4, 64
    g = samplers.spin_variance_grid(g0, g1, n).numpy()
    assert g[0] == g0 and g[-1] == g1 and len(g) == n + 1 and np.all(np.diff(g) > 0)
    # independent quadrature of the floored density over each step (Simpson on 201 points per step)
    fine = np.linspace(g0, g1, 20001)
    vmax = float(samplers.spin_posterior_variance(torch.from_numpy(fine)).max())

    def density(x):
        v = samplers.spin_posterior_variance(torch.from_numpy(x)).numpy()
        return np.maximum(v, samplers.SPIN_GRID_FLOOR * vmax)

    def simpson(a, b):
        x = np.linspace(a, b, 201)
        y = density(x)
        h = (b - a) / 200
        return h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    mass = np.array([simpson(a, b) for a, b in zip(g[:-1], g[1:])])
    assert np.allclose(mass, mass.mean(), rtol=2e-3), (mass.min(), mass.max())
    # and the steps follow the variance: fine where spins are undecided, coarse where they are
    steps = np.diff(g)
    assert steps[0] > 5 * steps[-1]


def _spin_vdm(sample_grid: str = "time") -> VDM:
    cfg = VDMConfig(num_timesteps=0, schedule="linear", gamma_min=-4.0, gamma_max=6.0, architecture="mlp",
                    mlp_hidden=8, mlp_layers=1, emb_dim=8, sample_grid=sample_grid)
    meta = DataMeta(sample_shape=(4,), data_kind="spins")
    cfg.check_data(meta)
    return VDM(cfg, meta)


def test_model_default_grid_and_override():
    vdm = _spin_vdm("spin-variance")
    want = samplers.spin_variance_grid(-4.0, 6.0, 16)
    assert torch.allclose(vdm.sample_gammas(16, "cpu").double(), want, atol=1e-5)
    uniform = vdm.sample_gammas(16, "cpu", "time")
    assert torch.allclose(uniform, torch.linspace(-4.0, 6.0, 17), atol=1e-5)
    x = vdm.sample(8, num_steps=16, generator=torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    # the default model grid is uniform in time, as before the option existed
    assert torch.allclose(_spin_vdm().sample_gammas(16, "cpu"), uniform)
    # what `pipeline evaluate` records: the model's grid unless --grid says otherwise, 128 steps by default
    assert vdm.sampling_settings(None, None) == {"sampler": "ancestral", "eta": None, "grid": "spin-variance",
                                                 "num_steps": 128}
    assert vdm.sampling_settings(16, SamplerConfig("ddim", eta=0.5, spacing="time")) == {
        "sampler": "ddim", "eta": 0.5, "grid": "time", "num_steps": 16}


def test_grid_refused_where_it_does_not_apply():
    cfg = VDMConfig(num_timesteps=0, sample_grid="spin-variance", architecture="mlp")
    with pytest.raises(ConfigError, match="posterior variance of a \\+-1 spin.*'continuous': use time or logsnr"):
        cfg.check_data(DataMeta(sample_shape=(2,), data_kind="continuous"))
    with pytest.raises(ConfigError, match="needs continuous time"):
        VDMConfig(num_timesteps=10, sample_grid="spin-variance").validate()
    with pytest.raises(ConfigError, match="unknown vdm.sample_grid 'bogus'; allowed: time, logsnr, spin-variance"):
        VDMConfig(sample_grid="bogus").validate()
    gmm = VDM(VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=8, mlp_layers=1, emb_dim=8),
              DataMeta(sample_shape=(2,), data_kind="continuous"))
    with pytest.raises(ValueError, match="--grid spin-variance follows the posterior variance of a \\+-1 spin"):
        gmm.check_sample_options(8, SamplerConfig(spacing="spin-variance"))


def test_on_gaussian_data_the_uniform_grid_is_closer():
    # The docstring's reason to offer the grid for spins only: per Gaussian mode (variances 0.3-4,
    # gamma in [-4, 6], 128 steps) the chain's variance, relative to its many-step limit, is further
    # from 1 on the spin-variance grid than on the uniform one.
    g0, g1, n = -4.0, 6.0, 128
    grids = {"uniform": np.linspace(g1, g0, n + 1),
             "spin": samplers.spin_variance_grid(g0, g1, n).numpy()[::-1]}
    worst = {}
    for name, gammas in grids.items():
        errs = []
        for p in (0.3, 1.0, 4.0):
            limit = ancestral_chain_law(np.linspace(g1, g0, 8193), 0.0, p)[1]
            errs.append(abs(ancestral_chain_law(gammas, 0.0, p)[1] / limit - 1))
        worst[name] = max(errs)
    assert worst["uniform"] < 0.05 and worst["spin"] > 2 * worst["uniform"], worst
