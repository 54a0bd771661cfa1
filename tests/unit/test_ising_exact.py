"""Exact 2D Ising results against published values, limits, expansions and brute force."""

import math

import numpy as np
import pytest
from scipy import integrate, special

from pipeline.physics import ising


def test_critical_temperature_is_self_dual_point():
    # Kramers-Wannier: sinh(2 K_c) = 1.
    assert math.sinh(2.0 / ising.T_CRITICAL) == pytest.approx(1.0, abs=1e-14)
    assert round(ising.T_CRITICAL, 4) == 2.2692


def test_published_values():
    # Onsager U/N(T=3) = -0.8173; Yang m(T=2) = 0.9113 (to the 4 digits given).
    assert abs(ising.exact_energy_per_spin(3.0) - (-0.8173)) < 5e-5
    assert abs(ising.exact_magnetisation(2.0) - 0.9113) < 5e-5
    # Entropy S/N(T=3) = 0.5435 nats is quoted to 4 digits; the exact value is 0.543446.
    assert abs(ising.exact_entropy_per_spin(3.0) - 0.5435) < 1e-4


def test_energy_at_critical_point_and_continuity():
    # U(T_c) = -sqrt 2, and U is continuous there (K1 diverges, its prefactor vanishes).
    u_c = ising.exact_energy_per_spin(ising.T_CRITICAL)
    assert u_c == pytest.approx(-math.sqrt(2.0), abs=1e-12)
    near = ising.exact_energy_per_spin(np.array([ising.T_CRITICAL * (1 - 1e-7), ising.T_CRITICAL * (1 + 1e-7)]))
    np.testing.assert_allclose(near, u_c, atol=1e-5)


def _minus_beta_f_double_integral(temperature):
    # Onsager (1944), the original double integral:
    # -beta F/N = ln 2 + 1/(2 pi^2) int_0^pi int_0^pi ln[cosh^2 2K - sinh 2K (cos a + cos b)] da db.
    k = 1.0 / temperature
    c2, s2 = math.cosh(2 * k) ** 2, math.sinh(2 * k)
    value, _ = integrate.dblquad(
        lambda a, b: math.log(c2 - s2 * (math.cos(a) + math.cos(b))),
        0, math.pi, 0, math.pi, epsabs=1e-11, epsrel=1e-11,
    )
    return math.log(2.0) + value / (2 * math.pi**2)


@pytest.mark.parametrize("temperature", [1.5, 3.0, 6.0])
def test_free_energy_single_integral_matches_double_integral(temperature):
    f = ising.exact_free_energy_per_spin(temperature)
    assert -f / temperature == pytest.approx(_minus_beta_f_double_integral(temperature), abs=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 2.5, 3.0, 5.0])
def test_energy_and_entropy_are_derivatives_of_free_energy(temperature):
    # U = d(beta F)/d(beta) and S = -dF/dT, from the quadrature F alone (independent of
    # Onsager's closed-form U).
    h = 1e-4

    def beta_f(beta):
        return ising.exact_free_energy_per_spin(1.0 / beta) * beta

    beta = 1.0 / temperature
    u_numeric = (beta_f(beta + h) - beta_f(beta - h)) / (2 * h)
    assert ising.exact_energy_per_spin(temperature) == pytest.approx(u_numeric, abs=1e-7)
    f = ising.exact_free_energy_per_spin
    s_numeric = -(f(temperature + h) - f(temperature - h)) / (2 * h)
    assert ising.exact_entropy_per_spin(temperature) == pytest.approx(s_numeric, abs=1e-7)


@pytest.mark.parametrize("temperature", [0.8, 1.5, 2.0, 2.25, 2.3, 3.0, 10.0])
def test_specific_heat_is_derivative_of_energy(temperature):
    h = 1e-5 * temperature
    u = ising.exact_energy_per_spin
    c_numeric = (u(temperature + h) - u(temperature - h)) / (2 * h)
    assert ising.exact_specific_heat(temperature) == pytest.approx(c_numeric, rel=1e-6, abs=1e-12)
    assert ising.exact_specific_heat(ising.T_CRITICAL) == math.inf


def test_low_temperature_limits_and_expansion():
    assert ising.exact_energy_per_spin(0.05) == pytest.approx(-2.0, abs=1e-12)
    assert ising.exact_entropy_per_spin(0.05) == pytest.approx(0.0, abs=1e-12)
    assert ising.exact_magnetisation(0.05) == pytest.approx(1.0, abs=1e-12)
    # Low-T expansion: excitations are one flipped spin (dE = 8, N ways) and two adjacent
    # flipped spins (dE = 12, 2N ways), so beta F/N = -2K - e^{-8K} - 2 e^{-12K} + O(e^{-16K})
    # and U/N = -2 + 8 e^{-8K} + 24 e^{-12K}.
    k = 1.0 / 0.5
    expected = -2.0 + 8 * math.exp(-8 * k) + 24 * math.exp(-12 * k)
    assert ising.exact_energy_per_spin(0.5) + 2.0 == pytest.approx(expected + 2.0, rel=1e-5)


def test_high_temperature_limits_and_expansion():
    assert ising.exact_entropy_per_spin(1e4) == pytest.approx(math.log(2.0), abs=1e-7)
    assert ising.exact_energy_per_spin(1e4) == pytest.approx(0.0, abs=1e-3)
    assert ising.exact_magnetisation(3.0) == 0.0
    # High-T expansion: Z = 2^N cosh^{2N} K (1 + N t^4 + O(t^6)), t = tanh K.
    temperature = 20.0
    k, t = 1.0 / temperature, math.tanh(1.0 / temperature)
    expected = math.log(2.0) + 2 * math.log(math.cosh(k)) + t**4
    assert -ising.exact_free_energy_per_spin(temperature) / temperature == pytest.approx(expected, abs=1e-7)


def test_magnetisation_vanishes_continuously_at_critical_point():
    # Yang's m ~ (T_c - T)^(1/8): small but non-zero just below T_c, zero above.
    m = ising.exact_magnetisation(np.array([ising.T_CRITICAL * (1 - 1e-6), ising.T_CRITICAL * (1 + 1e-6)]))
    assert 0.0 < m[0] < 0.3 and m[1] == 0.0


# --- finite lattices: brute-force enumeration vs Kaufman's exact partition function -----


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 5), (2, 3)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, ising.T_CRITICAL, 2.5, 3.0, 10.0])
def test_enumeration_matches_kaufman_partition_function(rows, cols, temperature):
    _, energies = ising.enumerate_states(rows, cols)
    log_z_brute = special.logsumexp(-energies / temperature)
    assert ising.exact_log_partition_function(temperature, rows, cols) == pytest.approx(log_z_brute, rel=1e-12)


def test_enumeration_4x4_ground_states_and_energy_symmetry():
    states, energies = ising.enumerate_states(4, 4)
    assert states.shape == (65536, 4, 4)
    assert energies.min() == -32 and np.sum(energies == -32) == 2  # all up, all down
    assert energies.max() == 32 and np.sum(energies == 32) == 2  # the two checkerboards
    # Bipartite lattice: flipping one sublattice maps E -> -E, so levels are symmetric.
    levels, counts = np.unique(energies, return_counts=True)
    np.testing.assert_array_equal(levels, -levels[::-1])
    np.testing.assert_array_equal(counts, counts[::-1])


@pytest.mark.parametrize("temperature", [1.5, ising.T_CRITICAL, 3.0])
def test_4x4_energy_enumeration_matches_kaufman_derivative(temperature):
    # Finite-size U/N = -(1/N) d ln Z / d beta: brute-force average vs Kaufman's formula.
    _, energies = ising.enumerate_states(4, 4)
    u_brute = float(np.sum(ising.boltzmann_weights(energies, temperature) * energies)) / 16
    beta, h = 1.0 / temperature, 1e-5
    log_z = lambda b: ising.exact_log_partition_function(1.0 / b, 4, 4)  # noqa: E731
    u_kaufman = -(log_z(beta + h) - log_z(beta - h)) / (2 * h) / 16
    assert u_brute == pytest.approx(u_kaufman, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.5, 3.0])
def test_kaufman_large_lattice_approaches_onsager(temperature):
    # Away from T_c finite-size corrections are exponentially small; below T_c the two
    # ordered phases add ln 2 to ln Z.
    size = 256
    log_z = ising.exact_log_partition_function(temperature, size, size)
    if temperature < ising.T_CRITICAL:
        log_z -= math.log(2.0)
    onsager = -ising.exact_free_energy_per_spin(temperature) / temperature
    assert log_z / size**2 == pytest.approx(onsager, abs=1e-10)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_exact_functions_reject_bad_temperature(bad):
    for fn in (
        ising.exact_energy_per_spin,
        ising.exact_magnetisation,
        ising.exact_free_energy_per_spin,
        ising.exact_entropy_per_spin,
        ising.exact_specific_heat,
    ):
        with pytest.raises(ValueError, match="temperature"):
            fn(bad)


def test_enumeration_rejects_large_lattices():
    with pytest.raises(ValueError, match="rows \\* cols"):
        ising.enumerate_states(5, 5)
    with pytest.raises(ValueError, match="rows"):
        ising.enumerate_states(1, 4)
