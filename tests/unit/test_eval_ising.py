"""Ising evaluation: exact finite-lattice values, MC reference vs exact results, and the
evaluator's verdict on a right and a deliberately wrong sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.ising import (
    compare_with_entropy,
    evaluate_ising,
    exact_finite_lattice,
    measure,
    variance_estimate,
)
from pipeline.physics.ising import (
    T_CRITICAL,
    boltzmann_weights,
    enumerate_states,
    exact_energy_per_spin,
    exact_entropy_per_spin,
    exact_magnetisation,
    sample_ising,
)

L = 16
N = 600


@pytest.fixture(scope="module")
def lattices():
    """Independent MC draws (different seeds): two at T = 3.0, one at T = 2.5, one at T = 2.0."""
    return {
        "ref3": sample_ising(3.0, L, N, seed=11),
        "gen3": sample_ising(3.0, L, N, seed=12),
        "gen25": sample_ising(2.5, L, N, seed=13),
        "low2": sample_ising(2.0, L, N, seed=14),
    }


@pytest.mark.parametrize("temperature", [1.5, T_CRITICAL, 3.0, 5.0])
def test_exact_finite_lattice_matches_brute_force_enumeration(temperature):
    states, energies = enumerate_states(4, 4)
    w = boltzmann_weights(energies, temperature)
    e = energies.astype(np.float64)
    u = np.sum(w * e) / 16
    c = (np.sum(w * e**2) - np.sum(w * e) ** 2) / temperature**2 / 16
    s = -np.sum(w * np.log(w)) / 16  # Gibbs entropy in nats
    f = exact_finite_lattice(temperature, 4)
    assert f.energy_per_spin == pytest.approx(u, abs=1e-7)
    assert f.specific_heat == pytest.approx(c, abs=1e-5)
    assert f.entropy_per_spin == pytest.approx(s, abs=1e-7)


def test_exact_finite_lattice_approaches_onsager_for_large_lattices():
    # Away from T_c finite-size corrections vanish exponentially in L/xi, except that below
    # T_c the finite lattice has two ordered phases (+ and -): Z_L ~ 2 Z_one-phase, so its
    # entropy per spin exceeds Onsager's by ln 2 / L^2.
    n = 64 * 64
    for t, extra in ((1.8, math.log(2) / n), (3.0, 0.0)):
        f = exact_finite_lattice(t, 64)
        assert f.energy_per_spin == pytest.approx(exact_energy_per_spin(t), abs=1e-6)
        assert f.entropy_per_spin == pytest.approx(exact_entropy_per_spin(t) + extra, abs=2e-6)


def test_monte_carlo_reference_matches_exact_values(lattices):
    hi = measure(lattices["ref3"], 3.0)
    # Energy within a few % of Onsager at T = 3.0 for L = 16 (and within errors of Kaufman's L = 16 value).
    assert hi.energy_per_spin.value == pytest.approx(exact_energy_per_spin(3.0), rel=0.03)
    assert abs(hi.energy_per_spin.value - exact_finite_lattice(3.0, L).energy_per_spin) < 5 * hi.energy_per_spin.stderr
    # Specific heat from fluctuations against the exact finite-lattice value.
    assert hi.specific_heat.value == pytest.approx(exact_finite_lattice(3.0, L).specific_heat, rel=0.2)
    lo = measure(lattices["low2"], 2.0)
    assert exact_magnetisation(2.0) == pytest.approx(0.9113, abs=1e-4)  # Yang (1952)
    assert lo.abs_magnetisation.value == pytest.approx(0.9113, abs=0.01)


def test_right_sampler_not_flagged_wrong_temperature_flagged(lattices):
    good = evaluate_ising(lattices["gen3"], lattices["ref3"], 3.0)
    assert good.flags == [], good.flags
    assert good.pvalue_energy > 1e-3 and good.pvalue_abs_magnetisation > 1e-3
    assert abs(good.z_energy_reference) < 5 and abs(good.z_energy_exact_finite) < 5

    bad = evaluate_ising(lattices["gen25"], lattices["ref3"], 3.0)
    assert bad.pvalue_energy < 1e-10
    # W1 of the energy ~ the shift of the mean energy between T = 2.5 and 3.0 (~0.25 per spin).
    assert bad.w1_energy > 10 * good.w1_energy
    assert bad.w1_energy == pytest.approx(abs(exact_energy_per_spin(2.5) - exact_energy_per_spin(3.0)), rel=0.3)
    assert any("energy per spin off by" in f and "reference" in f for f in bad.flags)
    assert any("Kaufman" in f for f in bad.flags)
    assert any("energy distribution differs" in f for f in bad.flags)


def test_reference_at_wrong_temperature_is_itself_flagged(lattices):
    # Reference labelled T = 3.0 but drawn at 2.5: the exact solution catches the data, not the model.
    r = evaluate_ising(lattices["gen3"], lattices["gen25"], 3.0)
    assert any("REFERENCE" in f for f in r.flags)


def test_report_fields_and_notes_above_and_below_tc(lattices):
    r = evaluate_ising(lattices["gen3"], lattices["ref3"], 3.0)
    assert r.magnetisation_exact == 0.0 and r.abs_magnetisation > 0.05  # O(1/L) on a finite lattice
    assert any("O(1/L)" in n for n in r.notes)
    assert r.energy_exact == pytest.approx(exact_energy_per_spin(3.0))
    assert len(r.correlation_function) == L // 2 + 1 and r.correlation_function[0] == 1.0
    assert 0 < r.correlation_length < L
    assert r.correlation_function_max_abs_diff < 0.05
    low = evaluate_ising(lattices["low2"][:300], lattices["low2"][300:], 2.0)
    assert low.magnetisation_exact == pytest.approx(0.9113, abs=1e-4)
    assert any("Yang" in n for n in low.notes)


def test_variance_standard_error_matches_gaussian_theory():
    # For a normal sample, se(s^2) = sqrt(2/n) sigma^2.
    x = np.random.default_rng(0).normal(0.0, 2.0, size=200_000)
    est = variance_estimate(x)
    assert est.value == pytest.approx(4.0, rel=0.01)
    assert est.stderr == pytest.approx(math.sqrt(2 / x.size) * 4.0, rel=0.02)


def test_entropy_bound():
    s_fin = exact_finite_lattice(3.0, 8).entropy_per_spin / math.log(2)
    ok = compare_with_entropy(s_fin + 0.05, 0.01, 3.0, 8)
    assert ok.flags == [] and ok.gap_bits_per_spin == pytest.approx(0.05)
    assert ok.entropy_bits_per_spin == pytest.approx(float(exact_entropy_per_spin(3.0)) / math.log(2))
    impossible = compare_with_entropy(s_fin - 0.1, 0.01, 3.0, 8)
    assert impossible.flags and "BELOW the exact entropy" in impossible.flags[0]


def test_bad_input_raises_clear_errors(lattices):
    with pytest.raises(ValueError, match="compare lattices of one size"):
        evaluate_ising(lattices["gen3"][:, :8, :8], lattices["ref3"], 3.0)
    with pytest.raises(ValueError, match="spins"):
        evaluate_ising(np.zeros((4, 8, 8)), lattices["ref3"][:, :8, :8], 3.0)
    with pytest.raises(ValueError, match="temperature"):
        evaluate_ising(lattices["gen3"], lattices["ref3"], -1.0)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_ising(lattices["gen3"][:1], lattices["ref3"], 3.0)
