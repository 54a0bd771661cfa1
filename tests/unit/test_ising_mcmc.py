"""The Monte Carlo sampler against exact results: Onsager, Yang, Kaufman and brute force."""

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.physics import ising


def _energy_per_spin(x: np.ndarray) -> np.ndarray:
    # Written out here (not imported from observables) so the sampler test stands alone.
    s = x.astype(np.int64)
    return -(s * (np.roll(s, -1, axis=2) + np.roll(s, -1, axis=1))).sum(axis=(1, 2)) / (s.shape[1] * s.shape[2])


def _chi_square_pvalue(observed_values: np.ndarray, levels: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; levels with expected count < 5 are pooled."""
    n = observed_values.size
    counts = np.array([np.sum(observed_values == level) for level in levels], dtype=np.float64)
    assert counts.sum() == n, "a sample fell outside the enumerated levels"
    expected = n * probabilities
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def _exact_level_probabilities(values: np.ndarray, weights: np.ndarray):
    levels = np.unique(values)
    return levels, np.array([weights[values == level].sum() for level in levels])


def test_energy_32x32_at_T3_matches_onsager():
    x = ising.sample_ising(3.0, 32, 512, seed=0)
    e = _energy_per_spin(x)
    onsager = ising.exact_energy_per_spin(3.0)
    tolerance = 0.02 * abs(onsager)
    # Samples of one chain are correlated, so bound the error by a generous 3x naive SE.
    assert 3 * e.std() / math.sqrt(e.size) < tolerance / 2, "too few samples for a meaningful test"
    assert abs(e.mean() - onsager) < tolerance


def test_abs_magnetisation_32x32_at_T2_matches_yang():
    x = ising.sample_ising(2.0, 32, 512, seed=0)
    m = np.abs(x.astype(np.float64).mean(axis=(1, 2)))
    yang = ising.exact_magnetisation(2.0)
    tolerance = 0.03 * yang
    assert 3 * m.std() / math.sqrt(m.size) < tolerance / 2, "too few samples for a meaningful test"
    assert abs(m.mean() - yang) < tolerance


@pytest.mark.parametrize("temperature", [1.5, ising.T_CRITICAL, 3.0])
def test_4x4_sampler_reproduces_exact_distribution(temperature):
    # One sample per chain: the samples are independent, so naive errors and the
    # chi-square test are valid. Compares the full distributions of E and |M| with brute
    # force, which detects a violation of detailed balance, not only a biased mean.
    num_samples = 8192
    x = ising.sample_ising(temperature, 4, num_samples, seed=1, num_chains=num_samples, burn_in_sweeps=30)
    states, energies = ising.enumerate_states(4, 4)
    w = ising.boltzmann_weights(energies, temperature)

    e = _energy_per_spin(x) * 16
    u_exact = float(np.sum(w * energies))
    assert abs(e.mean() - u_exact) < 4 * e.std() / math.sqrt(num_samples)
    assert _chi_square_pvalue(e, *_exact_level_probabilities(energies, w)) > 1e-3

    abs_m = np.abs(x.astype(np.int64).sum(axis=(1, 2)))
    exact_abs_m = np.abs(states.astype(np.int64).sum(axis=(1, 2)))
    assert _chi_square_pvalue(abs_m, *_exact_level_probabilities(exact_abs_m, w)) > 1e-3


@pytest.mark.parametrize(
    "kernel,rows,cols",
    [
        (ising.metropolis_sweep, 4, 4),
        (ising.metropolis_sweep, 3, 3),
        (ising.metropolis_sweep, 3, 4),
        (ising.swendsen_wang_step, 4, 4),
        (ising.swendsen_wang_step, 3, 3),
        (ising.swendsen_wang_step, 2, 4),
    ],
)
def test_each_update_kernel_alone_samples_boltzmann(kernel, rows, cols):
    # Each kernel must leave the Boltzmann distribution invariant on its own. (3, 3) is odd
    # and periodic, so not bipartite: Metropolis must not use a plain checkerboard there.
    # (Metropolis alone is not ergodic on a side of 2; see its docstring and the next test.)
    temperature = 2.0
    num_chains = 8192
    rng = np.random.default_rng(7)
    spins = (2 * rng.integers(0, 2, size=(num_chains, rows, cols), dtype=np.int8) - 1).astype(np.int8)
    for _ in range(40):
        kernel(spins, 1.0 / temperature, rng)
    _, energies = ising.enumerate_states(rows, cols)
    w = ising.boltzmann_weights(energies, temperature)
    e = _energy_per_spin(spins) * rows * cols
    assert _chi_square_pvalue(np.round(e), *_exact_level_probabilities(energies, w)) > 1e-3


@pytest.mark.parametrize("size", [2, 3])
def test_tiny_lattices_sample_exact_distribution(size):
    # Side 2 doubles the coupling along each axis and side 3 is not bipartite: edge cases
    # of the neighbour sums and the colouring.
    temperature, num_samples = 2.0, 4096
    x = ising.sample_ising(temperature, size, num_samples, seed=2, num_chains=num_samples, burn_in_sweeps=30)
    _, energies = ising.enumerate_states(size, size)
    w = ising.boltzmann_weights(energies, temperature)
    e = np.round(_energy_per_spin(x) * size * size)
    assert _chi_square_pvalue(e, *_exact_level_probabilities(energies, w)) > 1e-3


def test_16x16_at_critical_point_matches_kaufman():
    # At T_c local updates decorrelate slowly; the cluster update must still give the exact
    # finite-size U and C (from Kaufman's ln Z, no enumeration possible at 2^256 states).
    size, temperature, num_samples = 16, ising.T_CRITICAL, 512
    x = ising.sample_ising(temperature, size, num_samples, seed=3, num_chains=num_samples)
    e = _energy_per_spin(x)
    beta, h, n = 1.0 / temperature, 1e-4, size * size
    log_z = lambda b: ising.exact_log_partition_function(1.0 / b, size, size)  # noqa: E731
    u_exact = -(log_z(beta + h) - log_z(beta - h)) / (2 * h) / n
    c_exact = beta**2 * (log_z(beta + h) - 2 * log_z(beta) + log_z(beta - h)) / h**2 / n
    assert abs(e.mean() - u_exact) < 4 * e.std() / math.sqrt(num_samples)
    c = n * e.var() / temperature**2
    # SE of a sample variance: sqrt((mu4 - sigma^4) / n_samples).
    se_var = math.sqrt((np.mean((e - e.mean()) ** 4) - e.var() ** 2) / num_samples)
    assert abs(c - c_exact) < 4 * n * se_var / temperature**2


def test_both_ordered_phases_appear_below_critical_temperature():
    x = ising.sample_ising(1.5, 16, 256, seed=0)
    m = x.astype(np.float64).mean(axis=(1, 2))
    assert np.all(np.abs(m) > 0.8)  # ordered
    assert 0.35 < np.mean(m > 0) < 0.65  # both signs, about equally often


def test_output_format():
    x = ising.sample_ising(2.5, 6, 37, seed=0, num_chains=8, burn_in_sweeps=5, sweeps_between=2)
    assert x.shape == (37, 6, 6) and x.dtype == np.int8
    assert set(np.unique(x)) <= {-1, 1}


def test_deterministic_for_a_seed():
    kwargs = dict(burn_in_sweeps=10, sweeps_between=2, num_chains=16)
    a = ising.sample_ising(2.3, 8, 64, seed=5, **kwargs)
    b = ising.sample_ising(2.3, 8, 64, seed=5, **kwargs)
    c = ising.sample_ising(2.3, 8, 64, seed=6, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-2.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(size=1), "size"),
        (dict(size=4.5), "size"),
        (dict(num_samples=0), "num_samples"),
        (dict(seed=-1), "seed"),
        (dict(burn_in_sweeps=-1), "burn_in_sweeps"),
        (dict(sweeps_between=0), "sweeps_between"),
        (dict(num_chains=0), "num_chains"),
        (dict(num_chains=True), "num_chains"),
    ],
)
def test_rejects_bad_input(kwargs, name):
    args = dict(temperature=2.0, size=4, num_samples=4, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ising.sample_ising(args.pop("temperature"), args.pop("size"), args.pop("num_samples"), **args)
