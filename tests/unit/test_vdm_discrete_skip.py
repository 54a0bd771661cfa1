"""vdm.skip=discrete: the exact denoiser of independent values on the data's discrete levels,
checked against the posterior mean summed by hand over the levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.meta import DataMeta
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm.denoiser import DiscreteSkip
from tests.unit.skips import train_skip_over_ranks


def _cfg(**kw) -> VDMConfig:
    # The MLP's output layer starts at zero: the untrained denoiser is the skip alone.
    return VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=4, mlp_layers=1, emb_dim=8, skip="discrete", **kw)


def _level_batches(num_batches: int, num_levels: int, seed: int) -> list[torch.Tensor]:
    """Three values on levels 0..k-1: one mostly the top level, one spread, one never the top."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([[0.05] * (num_levels - 1) + [1.0], [1.0] * num_levels, [1.0] * (num_levels - 1) + [0.0]])
    return [torch.multinomial(probs, 64, replacement=True, generator=g).T.float() for _ in range(num_batches)]


def _posterior_eps(z: float, gamma: float, pi: list[float], levels: list[float]) -> float:
    """(z - alpha E[x | z]) / sigma with E[x | z] summed over the levels, p(z | x) written out."""
    a2, s2 = 1 / (1 + math.exp(gamma)), 1 / (1 + math.exp(-gamma))
    alpha, sigma = math.sqrt(a2), math.sqrt(s2)
    logw = [math.log(max(p, DiscreteSkip.MIN_PROB)) - 0.5 * (z - alpha * v) ** 2 / s2 for p, v in zip(pi, levels)]
    top = max(logw)
    w = [math.exp(lw - top) for lw in logw]
    x_mean = sum(wi * v for wi, v in zip(w, levels)) / sum(w)
    return (z - alpha * x_mean) / sigma


def test_discrete_skip_probabilities_are_the_levels_frequencies_gathered_over_ranks():
    meta = DataMeta(sample_shape=(3,), data_kind="levels", num_levels=4)
    batches = _level_batches(4, 4, seed=0)
    start = VDM(_cfg(), meta).denoiser.skip.probabilities()
    assert bool((start == 0.25).all())  # before any data: every level equally likely
    one = train_skip_over_ranks(VDM(_cfg(), meta), [[b] for b in batches])
    two = train_skip_over_ranks(VDM(_cfg(), meta), [[b[:40], b[40:]] for b in batches])
    data = torch.cat(batches).numpy()
    want = np.stack([(data == k).mean(0) for k in range(4)])
    assert want[3, 0] > 0.7 and want[3, 2] == 0  # the data has what it claims
    for m in (one, two):
        np.testing.assert_allclose(m.denoiser.skip.probabilities().numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("gamma", [-9.0, -3.0, 0.0, 4.0])
def test_discrete_skip_is_the_posterior_mean_of_eps_summed_over_the_levels(gamma):
    """The untrained denoiser (the skip alone) against E[eps | z] by hand, at z near each level,
    between levels and far out; a level the data never took at a value keeps MIN_PROB."""
    meta = DataMeta(sample_shape=(3,), data_kind="levels", num_levels=4)
    m = train_skip_over_ranks(VDM(_cfg(), meta), [[b] for b in _level_batches(4, 4, seed=1)])
    pi = m.denoiser.skip.probabilities().T.tolist()  # [value][level]
    levels = m.denoiser.skip.values.tolist()  # the model-space levels, as float32 data holds them
    np.testing.assert_allclose(levels, [-1.0, -1 / 3, 1 / 3, 1.0], rtol=1e-7)
    alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
    rows = [[alpha * v + k * sigma] * 3 for v in levels + [0.0, 3.0] for k in (-2.0, -0.3, 0.0, 1.1)]
    z = torch.tensor(rows, dtype=torch.float64)
    with torch.no_grad():
        got = m.denoiser.skip(z, torch.tensor(gamma, dtype=torch.float64))
        # ... and it is what the denoiser outputs (in float32, the network's dtype)
        torch.testing.assert_close(m.denoiser(z.float(), torch.tensor(gamma)), got.float(), rtol=1e-4, atol=2e-4)
    want = torch.tensor([[_posterior_eps(float(z[i, j]), gamma, pi[j], levels) for j in range(3)]
                         for i in range(z.shape[0])], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_discrete_skip_on_balanced_spins_is_the_mean_field_tanh_and_exact_at_low_noise():
    skip = DiscreteSkip((5,), torch.tensor([-1.0, 1.0]))
    spins = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    skip.add(skip.batch_sums(spins), torch.tensor(2.0))
    g = torch.Generator().manual_seed(4)
    for gamma in (-12.0, -2.0, 1.0):
        gm = torch.tensor(gamma, dtype=torch.float64)
        alpha, sigma = torch.sigmoid(-gm).sqrt(), torch.sigmoid(gm).sqrt()
        eps = torch.randn(2, 5, dtype=torch.float64, generator=g)
        z = alpha * spins + sigma * eps
        want = (z - alpha * torch.tanh(alpha * z / sigma**2)) / sigma
        torch.testing.assert_close(skip(z, gm), want, rtol=1e-9, atol=1e-9)
        if gamma == -12.0:  # the spins are recovered: the skip returns the noise itself
            torch.testing.assert_close(skip(z, gm), eps, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(skip(z.float(), gm.float()), eps.float(), rtol=1e-3, atol=1e-3)


def test_discrete_skip_refuses_continuous_data_and_the_sparse_one_points_to_it():
    with pytest.raises(ConfigError, match=r"vdm.skip=discrete .* data_kind 'continuous'.*gaussian"):
        VDM(VDMConfig(num_timesteps=0, skip="discrete"), DataMeta(sample_shape=(1, 4, 4), data_kind="continuous"))
    with pytest.raises(ConfigError, match=r"vdm.skip=sparse .* data_kind 'spins'.*vdm.skip=discrete"):
        VDM(VDMConfig(num_timesteps=0, skip="sparse"), DataMeta(sample_shape=(1, 4, 4), data_kind="spins"))


def test_a_level_never_seen_at_a_value_is_still_recovered_at_low_noise():
    """Value 2 of the data never takes the top level; a held-out sample that does is denoised
    exactly once the noise is low (the probability floor), and not at moderate noise, where
    the data's zero frequency rightly wins."""
    meta = DataMeta(sample_shape=(3,), data_kind="levels", num_levels=4)
    m = train_skip_over_ranks(VDM(_cfg(), meta), [[b] for b in _level_batches(4, 4, seed=1)])
    assert float(m.denoiser.skip.probabilities()[3, 2]) == 0.0
    eps = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    for gamma, recovered in ((-12.0, True), (-2.0, False)):
        g = torch.tensor(gamma, dtype=torch.float64)
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        z = alpha * torch.ones(1, 3, dtype=torch.float64) + sigma * eps  # x = the top level at every value
        got = m.denoiser.skip(z, g)
        assert bool(torch.allclose(got[0, 2], eps[0, 2], atol=1e-3)) == recovered, (gamma, got)
