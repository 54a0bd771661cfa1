"""Lattice phi^4: the free-field propagator against the inverse of the action's Hessian, the
HMC sampler against the exact free field and a non-Gaussian one-site integral within
standard errors, the autocorrelation estimator on AR(1), observables on known fields, CLI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import multivariate_normal

from pipeline.cli import main as pipeline_main
from pipeline.data import shards
from pipeline.physics import phi4


def _hessian(theory: phi4.Phi4) -> np.ndarray:
    """d^2 S / dphi_i dphi_j by central differences of the action itself (exact for a
    quadratic action, whatever the step)."""
    n, L = theory.num_sites, theory.size
    e = np.eye(n).reshape(n, L, L)
    h = np.empty((n, n))
    for i, j in itertools.product(range(n), repeat=2):
        s = [theory.action(si * e[i] + sj * e[j]) for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
        h[i, j] = (s[0] - s[1] - s[2] + s[3]) / 4
    return h


@pytest.mark.parametrize("size,kappa", [(4, 0.15), (5, 0.22)])
def test_free_propagator_is_the_inverse_hessian(size, kappa):
    theory = phi4.Phi4(size, kappa, 0.0)
    cov = np.linalg.inv(_hessian(theory))  # exp(-S) = exp(-phi^T H phi / 2)
    g = phi4.free_two_point(size, kappa)
    np.testing.assert_allclose(cov[0].reshape(size, size), g, rtol=1e-10, atol=1e-12)
    assert cov[0].sum() == pytest.approx(phi4.free_susceptibility(kappa), rel=1e-10)
    assert phi4.free_susceptibility(kappa) == pytest.approx(1 / (2 * (1 - 4 * kappa)))
    # <|M|> of the normal M with variance sum_ij cov_ij / V^2
    var_m = cov.sum() / theory.num_sites**2
    assert phi4.free_abs_magnetisation(size, kappa) == pytest.approx(math.sqrt(2 * var_m / math.pi), rel=1e-10)
    entropy = multivariate_normal(np.zeros(theory.num_sites), cov).entropy() / theory.num_sites
    assert phi4.free_nll_nats_per_dim(size, kappa) == pytest.approx(entropy, rel=1e-10)


def test_force_is_the_gradient_of_the_action():
    theory = phi4.Phi4(5, 0.27, 0.4)
    phi = np.random.default_rng(0).normal(size=(3, 5, 5))
    h = 1e-6
    num = np.empty_like(phi)
    for idx in np.ndindex(*phi.shape[1:]):
        d = np.zeros_like(phi)
        d[(slice(None), *idx)] = h
        num[(slice(None), *idx)] = (theory.action(phi + d) - theory.action(phi - d)) / (2 * h)
    np.testing.assert_allclose(theory.force(phi), num, rtol=1e-6, atol=1e-6)


def _chain_means(values: np.ndarray, chain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard error) of per-configuration ``values`` [S, ...], the error from the
    spread of the chains' means (chains are independent; samples within one are not quite)."""
    means = np.stack([values[chain == c].mean(0) for c in np.unique(chain)])
    return means.mean(0), means.std(0, ddof=1) / math.sqrt(len(means))


def test_hmc_free_field_matches_the_exact_propagator():
    size, kappa = 6, 0.2
    theory = phi4.Phi4(size, kappa, 0.0)
    r = phi4.sample(theory, 1536, phi4.HMCConfig(num_chains=64, burn_in=100, pilot=200), np.random.default_rng(1))
    assert r.configs.shape == (1536, size, size) and r.acceptance > 0.9
    assert 0.5 <= r.tau_int < 10 and r.thin == math.ceil(2 * r.tau_int)
    phi = r.configs
    v = theory.num_sites
    g_k = np.abs(np.fft.fft2(phi)) ** 2 / v  # per configuration
    g_x = np.fft.ifft2(np.abs(np.fft.fft2(phi)) ** 2).real / v
    for est, exact in ((g_k, phi4.free_propagator_k(size, kappa)), (g_x, phi4.free_two_point(size, kappa)),
                       (v * phi4.magnetisation(phi) ** 2, phi4.free_susceptibility(kappa)),
                       (phi4.abs_magnetisation(phi), phi4.free_abs_magnetisation(size, kappa))):
        mean, se = _chain_means(est, r.chain)
        assert np.abs((mean - exact) / se).max() < 4.5, (mean, exact, se)
    np.testing.assert_allclose(phi4.two_point(phi), g_x.mean(0), rtol=1e-12)
    # The same test sees a wrong normalisation: the propagator of 2 kappa is far off.
    mean, se = _chain_means(g_x, r.chain)
    assert np.abs((mean - phi4.free_two_point(size, kappa * 1.1)) / se).max() > 10


def test_hmc_one_site_non_gaussian():
    """L = 1: both neighbours are the site itself, S = (1 - 2 lam - 4 kappa) phi^2 + lam phi^4,
    a double well whose moments are one-dimensional integrals."""
    kappa, lam = 0.1, 0.5
    theory = phi4.Phi4(1, kappa, lam)
    weight = lambda x: math.exp(-((1 - 2 * lam - 4 * kappa) * x * x + lam * x**4))  # noqa: E731
    z = quad(weight, -np.inf, np.inf)[0]
    exact = [quad(lambda x, p=p: x**p * weight(x), -np.inf, np.inf)[0] / z for p in (2, 4)]
    r = phi4.sample(theory, 4096, phi4.HMCConfig(step_size=0.3, num_leapfrog=5, num_chains=128, burn_in=50, pilot=100),
                    np.random.default_rng(2))
    phi = r.configs[:, 0, 0]
    for p, ex in zip((2, 4), exact):
        mean, se = _chain_means(phi**p, r.chain)
        assert abs(mean - ex) < 4.5 * se, (p, mean, ex, se)
    assert abs(phi.mean()) < 4.5 * _chain_means(phi, r.chain)[1]


def test_broken_phase_chains_start_ordered_and_no_chain_is_left_in_a_stripe():
    """Deep in the broken phase (|M| ~ 3.2) a hot start orders in domains; a chain whose
    domains close around the periodic lattice keeps a pair of domain walls (a stripe, |M| far
    below the rest) for far longer than the burn-in. The ordered start (the default) has none.
    The same check on hot chains sees the stripes, so it can fail."""
    theory = phi4.Phi4(12, 0.35, 0.02)

    def run(start: str):
        r = phi4.sample(theory, 512, phi4.HMCConfig(num_chains=128, burn_in=50, pilot=40, thin_factor=0.5, start=start),
                        np.random.default_rng(0))
        m = phi4.abs_magnetisation(r.configs)
        return r, m, int((m < 0.5 * np.median(m)).sum())

    ordered, m, walls = run("ordered")
    assert walls == 0 and np.median(m) > 3.0
    assert (np.sign(phi4.magnetisation(ordered.configs)) > 0).mean() == pytest.approx(0.5, abs=0.15)  # both signs
    hot, _, hot_walls = run("random")
    assert hot_walls >= 5
    # the striped chains' slow relaxation is what the pilot's tau_int measured
    assert hot.tau_int > 2 * ordered.tau_int
    with pytest.raises(ValueError, match="--start"):
        phi4.HMCConfig(start="cold")


def test_integrated_autocorrelation_time_of_ar1():
    """x_t = rho x_{t-1} + noise has rho(t) = rho^t, so tau_int = (1 + rho) / (2 (1 - rho))."""
    rho, num_t, chains = 0.8, 20000, 8
    rng = np.random.default_rng(3)
    x = np.empty((num_t, chains))
    x[0] = rng.normal(size=chains) / math.sqrt(1 - rho**2)
    for t in range(1, num_t):
        x[t] = rho * x[t - 1] + rng.normal(size=chains)
    tau, err = phi4.integrated_autocorrelation_time(x)
    assert tau == pytest.approx((1 + rho) / (2 * (1 - rho)), abs=4 * err) and err < 0.2
    assert phi4.integrated_autocorrelation_time(rng.normal(size=(5000, 4)))[0] == pytest.approx(0.5, abs=0.05)


def test_observables_on_known_fields():
    c = np.array([1.5, -1.5])[:, None, None] * np.ones((2, 4, 4))
    np.testing.assert_allclose(phi4.magnetisation(c), [1.5, -1.5])
    np.testing.assert_allclose(phi4.abs_magnetisation(c), [1.5, 1.5])
    assert phi4.susceptibility(c) == pytest.approx(16 * 1.5**2)  # V (<M^2> - <M>^2), <M> = 0
    np.testing.assert_allclose(phi4.two_point(c), 1.5**2)
    x = np.arange(8)
    wave = np.cos(2 * math.pi * 2 * x / 8)[None, :, None] * np.ones((1, 8, 8))  # cos(k x) along axis 0
    np.testing.assert_allclose(phi4.two_point(wave), 0.5 * np.cos(2 * math.pi * 2 * x / 8)[:, None] * np.ones((8, 8)),
                               atol=1e-12)


def test_cli_phi4_shards(tmp_path, capsys):
    out = tmp_path / "phi4"
    argv = ["shards", "phi4", "--size", "6", "--kappa", "0.2", "--lam", "0", "--num-samples", "64", "--out", str(out),
            "--burn-in", "20", "--pilot", "40", "--num-chains", "16", "--seed", "4"]
    assert pipeline_main(argv) == 0
    assert "integrated autocorrelation time of |M|" in capsys.readouterr().out
    m = shards.read_manifest(out)
    assert m["meta"]["sample_shape"] == [1, 6, 6] and m["meta"]["boundary"] == "periodic"
    assert m["schema"]["npy"] == {"dtype": "float32", "shape": [1, 6, 6]}
    assert m["schema"]["json"]["keys"] == ["chain", "index", "kappa", "lam", "trajectory"]
    assert m["info"]["phi4"] == {"size": 6, "kappa": 0.2, "lam": 0.0} and m["info"]["hmc"]["thin"] >= 1
    assert m["info"]["hmc"]["start"] == "ordered"  # the default: no chain left in a stripe in a broken phase
    assert m["info"]["free_field"]["susceptibility"] == pytest.approx(2.5)
    for bad, msg in ((["--kappa", "0.25"], "unstable for kappa >= 1/4"), (["--lam", "-1"], "--lam must be"),
                     (["--step-size", "0"], "HMC settings out of range"),
                     (["--start", "cold"], "--start must be one of ordered, random, got 'cold'")):
        args = [*argv[:-1], "9", *bad]
        args[args.index("--out") + 1] = str(tmp_path / "bad")
        assert pipeline_main(args) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _exact_free_draws(size: int, kappa: float, num: int, rng) -> np.ndarray:
    """Exact free-field configurations: C^(1/2) w with C = F^-1 diag(G(k)) F, w white."""
    w = rng.standard_normal((num, size, size))
    return np.fft.ifft2(np.sqrt(phi4.free_propagator_k(size, kappa)) * np.fft.fft2(w)).real


def test_evaluator_against_exact_free_field():
    from pipeline.eval.phi4 import compare_phi4

    theory = phi4.Phi4(8, 0.2, 0.0)
    rng = np.random.default_rng(5)
    good = compare_phi4(_exact_free_draws(8, 0.2, 2000, rng), _exact_free_draws(8, 0.2, 500, rng), theory)
    assert good["reference_kind"] == "exact free field" and good["susceptibility_reference"] == pytest.approx(2.5)
    assert abs(good["abs_magnetisation_z"]) < 4 and abs(good["susceptibility_z"]) < 4
    assert good["propagator_max_abs_z"] < 5 and good["propagator_max_rel_err"] < 0.25
    bad = compare_phi4(1.2 * _exact_free_draws(8, 0.2, 2000, rng), _exact_free_draws(8, 0.2, 500, rng), theory)
    assert bad["susceptibility_z"] > 10 and bad["abs_magnetisation_z"] > 5 and bad["propagator_max_abs_z"] > 10
    assert bad["susceptibility"] == pytest.approx(1.44 * 2.5, rel=0.1)
    # At lam > 0 the reference is the ensemble itself (with its tau_int inflation).
    inter = compare_phi4(_exact_free_draws(8, 0.2, 300, rng), _exact_free_draws(8, 0.2, 300, rng),
                         phi4.Phi4(8, 0.2, 0.01), tau_int=4.0, thin=2)
    assert inter["reference_kind"] == "HMC ensemble" and inter["susceptibility_reference_stderr"] > 0


def test_minkowski_functionals_against_the_reference_ensemble():
    """Exact free-field draws against exact free-field draws: every functional within the
    noise; the same fields scaled by 1.2 (a 44 % larger variance) cross the reference's
    thresholds elsewhere and are many standard errors off. The area fraction is checked
    against its Gaussian value Phi(-nu) independently of the estimator's comparison."""
    from scipy.stats import norm

    from pipeline.eval.phi4 import compare_minkowski_phi4

    rng = np.random.default_rng(7)
    ref = _exact_free_draws(8, 0.2, 600, rng)
    good = compare_minkowski_phi4(_exact_free_draws(8, 0.2, 2000, rng), ref)
    assert good["minkowski_max_abs_z"] < 4.5
    nu = np.asarray(good["minkowski"]["nu"])
    np.testing.assert_allclose(good["minkowski"]["mean"][0], norm.sf(nu), atol=0.02)
    wide = 1.2 * _exact_free_draws(8, 0.2, 2000, rng)
    bad = compare_minkowski_phi4(wide, ref)
    assert bad["minkowski_v0_max_abs_z"] > 6 and bad["minkowski_max_abs_z"] > 6
    # the reference's autocorrelation widens its errors, so the same difference weighs less
    inflated = compare_minkowski_phi4(wide, ref, inflation=3.0)
    assert inflated["minkowski_v0_max_abs_z"] < bad["minkowski_v0_max_abs_z"]
