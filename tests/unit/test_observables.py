"""Observables against hand-computed values, brute-force derivatives of ln Z, and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from pipeline.physics import ising
from pipeline.physics import observables as obs


def _checkerboard(size: int) -> np.ndarray:
    i, j = np.indices((size, size))
    return np.where((i + j) % 2 == 0, 1, -1).astype(np.int8)


# --- per-lattice observables -----------------------------------------------------------


def test_uniform_and_checkerboard_lattices():
    up = np.ones((1, 6, 6), dtype=np.int8)
    board = _checkerboard(6)[None]
    np.testing.assert_allclose(obs.energy_per_spin(up), [-2.0])
    np.testing.assert_allclose(obs.energy_per_spin(-up), [-2.0])
    np.testing.assert_allclose(obs.abs_magnetisation(-up), [1.0])
    np.testing.assert_allclose(obs.magnetisation(-up), [-1.0])
    np.testing.assert_allclose(obs.energy_per_spin(board), [2.0])
    np.testing.assert_allclose(obs.abs_magnetisation(board), [0.0])


def test_one_flipped_spin_and_stripes():
    x = np.ones((1, 4, 4), dtype=np.int8)
    x[0, 1, 2] = -1
    # Flipping one spin of the ground state breaks its 4 bonds: E = -32 + 8 over 16 sites.
    np.testing.assert_allclose(obs.energy_per_spin(x), [(-32 + 8) / 16])
    np.testing.assert_allclose(obs.abs_magnetisation(x), [14 / 16])
    # Columns alternating +,-: horizontal bonds all broken (+1 each), vertical all satisfied.
    stripes = np.tile(np.array([1, -1], dtype=np.int8), (4, 2))[None]
    np.testing.assert_allclose(obs.energy_per_spin(stripes), [0.0])


def test_accepts_channel_dim_and_torch_tensors():
    rng = np.random.default_rng(0)
    x = (2 * rng.integers(0, 2, size=(5, 8, 8)) - 1).astype(np.int8)
    expected = obs.energy_per_spin(x)
    np.testing.assert_allclose(obs.energy_per_spin(x[:, None]), expected)
    np.testing.assert_allclose(obs.energy_per_spin(torch.from_numpy(x).float()[:, None]), expected)
    np.testing.assert_allclose(obs.abs_magnetisation(torch.from_numpy(x)), np.abs(x.mean(axis=(1, 2))))


def test_to_spins_maps_by_sign():
    x = torch.tensor([[[-0.7, 0.0], [0.2, -1e-6]]])
    np.testing.assert_array_equal(obs.to_spins(x), [[[-1, 1], [1, -1]]])
    assert obs.to_spins(x).dtype == np.int8
    with pytest.raises(ValueError, match="non-finite"):
        obs.to_spins(np.array([np.nan]))


def test_rejects_non_spin_values_and_bad_shapes():
    with pytest.raises(ValueError, match="to_spins"):
        obs.energy_per_spin(np.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="shape"):
        obs.energy_per_spin(np.ones((4, 4)))
    with pytest.raises(ValueError, match="temperature"):
        obs.specific_heat(np.ones((2, 4, 4)), 0.0)
    with pytest.raises(ValueError, match="weights"):
        obs.specific_heat(np.ones((2, 4, 4)), 1.0, weights=[1.0, -1.0])


# --- fluctuation-dissipation against the 4x4 partition function -------------------------


def _log_z(beta: float, field: float = 0.0) -> float:
    # Brute-force ln Z(beta, h) = ln sum_s exp(-beta E(s) + beta h M(s)) over all 2^16 states.
    states, energies = ising.enumerate_states(4, 4)
    total_m = states.astype(np.int64).sum(axis=(1, 2))
    return float(special.logsumexp(-beta * energies + beta * field * total_m))


@pytest.mark.parametrize("temperature", [1.5, ising.T_CRITICAL, 3.5])
def test_specific_heat_matches_second_derivative_of_log_z(temperature):
    # C/N = (beta^2 / N) d^2 ln Z / d beta^2.
    states, energies = ising.enumerate_states(4, 4)
    w = ising.boltzmann_weights(energies, temperature)
    beta, h = 1.0 / temperature, 2e-4
    c_numeric = beta**2 * (_log_z(beta + h) - 2 * _log_z(beta) + _log_z(beta - h)) / h**2 / 16
    assert obs.specific_heat(states, temperature, weights=w) == pytest.approx(c_numeric, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.5, ising.T_CRITICAL, 3.5])
def test_susceptibility_matches_field_derivative_of_log_z(temperature):
    # chi = d<m>/dh at h = 0 = (1 / (N beta)) d^2 ln Z / dh^2.
    states, energies = ising.enumerate_states(4, 4)
    w = ising.boltzmann_weights(energies, temperature)
    beta, h = 1.0 / temperature, 2e-4
    chi_numeric = (_log_z(beta, h) - 2 * _log_z(beta) + _log_z(beta, -h)) / h**2 / (16 * beta)
    assert obs.susceptibility(states, temperature, weights=w) == pytest.approx(chi_numeric, rel=1e-5)


def test_abs_susceptibility_and_unweighted_batch():
    states, energies = ising.enumerate_states(4, 4)
    temperature = 2.0
    w = ising.boltzmann_weights(energies, temperature)
    m = states.astype(np.float64).mean(axis=(1, 2))
    expected = 16 * (np.sum(w * m**2) - np.sum(w * np.abs(m)) ** 2) / temperature
    assert obs.susceptibility(states, temperature, use_abs=True, weights=w) == pytest.approx(expected, rel=1e-12)
    # Unweighted = uniform weights = plain sample variance (ddof=0).
    batch = states[:: 997]
    e = batch.astype(np.float64)
    e = -(e * (np.roll(e, -1, 2) + np.roll(e, -1, 1))).sum(axis=(1, 2)) / 16
    assert obs.specific_heat(batch, 2.0) == pytest.approx(16 * e.var() / 4.0, rel=1e-12)


# --- correlations ------------------------------------------------------------------------


def test_correlation_of_known_patterns():
    r = np.arange(5)
    np.testing.assert_allclose(obs.two_point_correlation(np.ones((2, 8, 8))), np.ones(5), atol=1e-12)
    np.testing.assert_allclose(obs.two_point_correlation(_checkerboard(8)[None]), (-1.0) ** r, atol=1e-12)
    stripes = np.tile(np.array([1, -1]), (8, 4))[None]  # varies along x only
    np.testing.assert_allclose(obs.two_point_correlation(stripes), (1 + (-1.0) ** r) / 2, atol=1e-12)
    connected = obs.two_point_correlation(np.ones((1, 8, 8)), connected=True)
    np.testing.assert_allclose(connected, np.zeros(5), atol=1e-12)


def _correlation_by_loops(x: np.ndarray) -> np.ndarray:
    # Definition, no FFT: average of s_x s_{x+r} over sites, lattices and both axes.
    s = x.astype(np.float64)
    size = s.shape[1]
    return np.array(
        [
            0.5 * (np.mean(s * np.roll(s, -r, axis=1)) + np.mean(s * np.roll(s, -r, axis=2)))
            for r in range(size // 2 + 1)
        ]
    )


def test_correlation_fft_matches_direct_sum_and_decays_for_iid_spins():
    rng = np.random.default_rng(1)
    x = (2 * rng.integers(0, 2, size=(3, 10, 10)) - 1).astype(np.int8)
    np.testing.assert_allclose(obs.two_point_correlation(x), _correlation_by_loops(x), atol=1e-12)
    iid = (2 * rng.integers(0, 2, size=(64, 32, 32)) - 1).astype(np.int8)
    g = obs.two_point_correlation(iid)
    assert g[0] == pytest.approx(1.0)
    # Independent spins: G(r >= 1) has mean 0 and SE 1/sqrt(2 * 64 * 32^2) ~ 0.003.
    assert np.all(np.abs(g[1:]) < 0.02)


def _second_moment_xi_by_loops(states: np.ndarray, w: np.ndarray) -> float:
    # xi^2 from the definition: S(k) = sum_r G(r) cos(k . r) with G over all 2-D displacements.
    s = states.astype(np.float64)
    size = s.shape[1]
    k = 2 * math.pi / size
    s0 = s_k = 0.0
    for dy in range(size):
        for dx in range(size):
            g = float(np.sum(w * np.mean(s * np.roll(s, (-dy, -dx), axis=(1, 2)), axis=(1, 2))))
            s0 += g
            s_k += g * 0.5 * (math.cos(k * dx) + math.cos(k * dy))
    return math.sqrt(s0 / s_k - 1) / (2 * math.sin(k / 2))


@pytest.mark.parametrize("temperature", [2.5, 5.0])
def test_correlation_length_matches_definition_on_4x4_ensemble(temperature):
    states, energies = ising.enumerate_states(4, 4)
    w = ising.boltzmann_weights(energies, temperature)
    expected = _second_moment_xi_by_loops(states, w)
    assert obs.correlation_length(states, weights=w) == pytest.approx(expected, rel=1e-10)
    # Stronger coupling means longer correlations.
    assert obs.correlation_length(states, weights=ising.boltzmann_weights(energies, 2.0)) > expected


def test_correlation_length_limits():
    rng = np.random.default_rng(2)
    iid = (2 * rng.integers(0, 2, size=(64, 32, 32)) - 1).astype(np.int8)
    assert obs.correlation_length(iid) < 0.3
    assert obs.correlation_length(np.ones((1, 8, 8))) == math.inf
    assert obs.correlation_length(_checkerboard(8)[None]) == 0.0


# --- distances between samples -----------------------------------------------------------


def test_wasserstein1_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=300), rng.normal(0.4, 1.5, size=170)
    assert obs.wasserstein1(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)
    ia, ib = rng.integers(0, 5, size=50), rng.integers(1, 7, size=80)  # many ties
    assert obs.wasserstein1(ia, ib) == pytest.approx(stats.wasserstein_distance(ia, ib), rel=1e-12)
    assert obs.wasserstein1(a, a + 0.25) == pytest.approx(0.25, rel=1e-12)
    assert obs.wasserstein1(a, rng.permutation(a)) == 0.0
    with pytest.raises(ValueError, match="b"):
        obs.wasserstein1(a, [])


def test_wasserstein1_vs_sorted_difference():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=200), rng.normal(0.3, 2.0, size=200)
    # Equal-size empirical measures: W1 = mean |a_(i) - b_(i)| over order statistics.
    assert obs.wasserstein1(a, b) == pytest.approx(np.abs(np.sort(a) - np.sort(b)).mean(), rel=1e-12)


def test_two_sample_pvalue_separates_distributions():
    rng = np.random.default_rng(4)
    a, same, shifted = rng.normal(size=500), rng.normal(size=500), rng.normal(0.5, 1.0, size=500)
    assert obs.two_sample_pvalue(a, same) > 0.01
    assert obs.two_sample_pvalue(a, shifted) < 1e-6
