"""Minkowski functionals of 2D excursion sets (pipeline/physics/minkowski.py).

Each piece against an independent answer:
 - the estimators on shapes of known area, perimeter and Euler characteristic (discs,
   annuli, several components, a shape across the torus' seam; Cauchy-Crofton for a square
   averaged over orientations);
 - the exact lattice expectation against closed forms for white noise (independent sites:
   p, pi (p - p^2), p - 2 p^2 + p^4), the bivariate orthant against numerical integration;
 - many GRF draws against the exact lattice expectation, within standard errors; a field of
   another spectrum (same variance) fails;
 - the lattice expectation of a smooth field approaches Tomita's continuum curves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from pipeline.eval.grf import evaluate_grf
from pipeline.physics import minkowski as mk
from pipeline.physics.grf import GRF, PowerLaw

NU = np.asarray(mk.DEFAULT_THRESHOLDS)


def _functionals(mask: np.ndarray) -> tuple[float, float, float]:
    """Area, boundary length and Euler characteristic (totals, not per unit area) of a 0/1 map."""
    v = mk.minkowski_maps(mask.astype(float), [0.5])[0, :, 0] * mask.size
    return float(v[0]), float(v[1]), float(v[2])


def _disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 < r**2


def test_shapes_of_known_area_perimeter_and_euler_characteristic():
    area, perim, chi = _functionals(_disc(128, 64, 64, 30))
    assert area == pytest.approx(math.pi * 30**2, rel=0.01)
    assert perim == pytest.approx(2 * math.pi * 30, rel=0.03)
    assert chi == 1
    annulus = _disc(128, 64, 64, 30) & ~_disc(128, 64, 64, 12)
    area, perim, chi = _functionals(annulus)
    assert area == pytest.approx(math.pi * (30**2 - 12**2), rel=0.01)
    assert perim == pytest.approx(2 * math.pi * (30 + 12), rel=0.03)
    assert chi == 0
    two_holes = _disc(128, 64, 64, 40) & ~_disc(128, 50, 64, 8) & ~_disc(128, 80, 64, 8)
    assert _functionals(two_holes)[2] == -1
    three = _disc(128, 20, 20, 9) | _disc(128, 20, 90, 9) | _disc(128, 100, 60, 15)
    assert _functionals(three)[2] == 3
    # The map is a torus: a disc cut by the array's edges is still one disc.
    seam = np.roll(_disc(128, 64, 64, 30), (64, 64), axis=(0, 1))
    assert _functionals(seam) == _functionals(_disc(128, 64, 64, 30))


def test_crofton_perimeter_of_a_square_averaged_over_orientations():
    side, size = 40.0, 128
    y, x = np.mgrid[:size, :size] - size / 2 + 0.5
    perims = []
    for angle in np.linspace(0, math.pi / 2, 24, endpoint=False):
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * x + s * y, -s * x + c * y
        perims.append(_functionals((np.abs(u) < side / 2) & (np.abs(v) < side / 2))[1])
    assert np.mean(perims) == pytest.approx(4 * side, rel=0.02)
    assert perims[0] == pytest.approx(math.pi * side, rel=0.02)  # one orientation alone is biased


def test_bivariate_orthant_against_numerical_integration():
    for rho in (-0.6, 0.0, 0.3, 0.95):
        for nu in (-1.5, 0.0, 0.7, 2.5):
            # P(X > nu, Y > nu) = int_nu^inf phi(x) P(Y > nu | x) dx
            num = integrate.quad(lambda x: stats.norm.pdf(x) * stats.norm.sf((nu - rho * x) / math.sqrt(1 - rho**2)),
                                 nu, np.inf, epsabs=1e-13)[0]
            assert mk._orthant2(np.asarray(nu), rho) == pytest.approx(num, abs=1e-11)


def test_four_variate_orthant_against_the_equicorrelated_one_dimensional_integral():
    # Equicorrelated X_i = sqrt(rho) Z + sqrt(1 - rho) E_i: P(all > h) = E_Z[Phi((sqrt(rho) Z - h) / sqrt(1 - rho))^4].
    for rho in (0.2, 0.6, 0.95):
        corr = np.full((4, 4), rho) + (1 - rho) * np.eye(4)
        for nu in (-2.0, 0.0, 1.0, 2.5):
            num = integrate.quad(lambda z: stats.norm.pdf(z) * stats.norm.cdf((math.sqrt(rho) * z - nu)
                                                                              / math.sqrt(1 - rho)) ** 4,
                                 -np.inf, np.inf, epsabs=1e-13)[0]
            assert mk._orthant4(nu, corr) == pytest.approx(num, abs=1e-5)


def test_white_noise_expectation_has_the_independent_site_closed_form():
    exp = mk.gaussian_lattice_expectation(mk.LatticeCovariance(1.0, 0.0, 0.0, 0.0, 0.0), NU)
    p = stats.norm.sf(NU)
    np.testing.assert_allclose(exp[0], p, rtol=1e-14)
    np.testing.assert_allclose(exp[1], math.pi * (p - p**2), rtol=1e-12)  # (pi/4) (2 bonds) 2 p (1 - p)
    np.testing.assert_allclose(exp[2], p - 2 * p**2 + p**4, rtol=1e-6, atol=1e-10)
    x = np.random.default_rng(0).standard_normal((300, 32, 32))
    cmp = mk.compare_minkowski(x, 1.0, NU, exp)
    assert np.abs(cmp.z).max() < 4.5


def _field(n: float, cutoff: float | None = None, size: int = 32) -> GRF:
    return GRF(2, size, PowerLaw(n, amplitude=1.0, cutoff=cutoff))


def test_grf_draws_match_the_exact_lattice_expectation_and_another_spectrum_fails():
    f = _field(-2.0, cutoff=1.5)
    cov = mk.LatticeCovariance.from_correlation(f.correlation())
    exp = mk.gaussian_lattice_expectation(cov, NU)
    rng = np.random.default_rng(1)
    good = mk.compare_minkowski(f.sample(400, rng), math.sqrt(cov.c0), NU, exp)
    # 39 correlated z's: all within 4.5 standard errors under the reference.
    assert np.abs(good.z).max() < 4.5
    other = _field(-3.0, cutoff=1.5)
    x = other.sample(400, rng) * math.sqrt(f.point_variance() / other.point_variance())  # same C(0)
    bad = mk.compare_minkowski(x, math.sqrt(cov.c0), NU, exp)
    assert np.abs(bad.z[0]).max() < 4.5  # the one-point law is the same ...
    assert np.abs(bad.z[1]).max() > 10 and np.abs(bad.z[2]).max() > 10  # ... the geometry is not


def test_smooth_field_approaches_the_continuum_curves():
    gaps = []
    for cutoff in (0.6, 0.3):
        f = _field(-1.0, cutoff=cutoff, size=64)
        cov = mk.LatticeCovariance.from_correlation(f.correlation())
        # sigma1^2 of the forward difference from the discrete spectrum: (1/N) sum_k P(k) sum_j 4 sin^2(k_j / 2)
        k = 2 * math.pi * np.fft.fftfreq(64)
        lattice_k2 = 4 * np.sin(k[:, None] / 2) ** 2 + 4 * np.sin(k[None, :] / 2) ** 2
        assert cov.sigma1_sq == pytest.approx(float((f.power_full() * lattice_k2).sum()) / f.num_sites, rel=1e-10)
        lat = mk.gaussian_lattice_expectation(cov, NU)
        cont = mk.gaussian_continuum_expectation(cov.c0, cov.sigma1_sq, NU)
        np.testing.assert_allclose(lat[0], cont[0], rtol=1e-12)
        gaps.append(np.abs(lat - cont).max(axis=1) / np.abs(cont).max(axis=1))
    assert gaps[1][1] < 0.01 and gaps[1][2] < 0.03  # within 1 % (length), 3 % (Euler) of the curves' peak
    assert gaps[1][1] < gaps[0][1] and gaps[1][2] < gaps[0][2]  # and closer the smoother the field


def test_evaluate_grf_reports_minkowski_for_2d_fields():
    f = GRF(2, 16, PowerLaw(-2.0, amplitude=1.8))
    rng = np.random.default_rng(2)
    good = evaluate_grf(f.sample(300, rng), f, reference=f.sample(300, rng))
    assert good["minkowski_max_abs_z"] < 4.5 and good["minkowski_reference_max_abs_z"] < 4.5
    curves = good["minkowski"]
    assert np.asarray(curves["mean"]).shape == (3, len(NU)) == np.asarray(curves["continuum"]).shape
    # Samples too smooth (another spectrum, same variance): the Euler characteristic tells.
    other = GRF(2, 16, PowerLaw(-3.5, amplitude=1.8))
    x = other.sample(300, rng) * math.sqrt(f.point_variance() / other.point_variance())
    bad = evaluate_grf(x, f)
    assert bad["minkowski_v2_max_abs_z"] > 10 and bad["minkowski_v2_chi2"] > 10 * good["minkowski_v2_chi2"]
    assert "minkowski_chi2" not in evaluate_grf(GRF(1, 32, PowerLaw(-2.0)).sample(8, rng), GRF(1, 32, PowerLaw(-2.0)))
