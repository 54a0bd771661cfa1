"""Gaussian random fields: generator, exact covariance and log-density, spectrum estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from pipeline.cli import main as pipeline_main
from pipeline.data import shards
from pipeline.data.config import DataConfig
from pipeline.data.stream import build_stream
from pipeline.errors import ConfigError
from pipeline.physics import grf
from pipeline.physics.observables import wasserstein1

GRIDS = [(1, 4), (1, 5), (2, 4), (2, 3), (3, 3), (3, 4)]  # odd and even L in every dimension


def dense_covariance(field: grf.GRF) -> np.ndarray:
    """Independent reference: C(x - y) = (1/N) sum_k P(|k|) cos(k.(x - y)) over the full grid,
    with P evaluated directly from the spectrum (P(0) by the documented zero-mode rule)."""
    L, d = field.size, field.ndim
    pos = np.array(np.meshgrid(*[np.arange(L)] * d, indexing="ij")).reshape(d, -1).T  # [N, d]
    m = np.array(np.meshgrid(*[np.fft.fftfreq(L, 1 / L)] * d, indexing="ij")).reshape(d, -1).T
    k_len = 2 * math.pi * np.linalg.norm(m, axis=1) / L
    p = np.array([field.spectrum(np.array([kk]))[0] if kk > 0 else field.spectrum(np.array([2 * math.pi / L]))[0]
                  for kk in k_len])
    phase = 2 * math.pi * (pos @ m.T) / L  # [N, N_k]
    c = np.cos(phase) @ np.diag(p) @ np.cos(phase).T + np.sin(phase) @ np.diag(p) @ np.sin(phase).T
    return c / L**d


@pytest.mark.parametrize("ndim,size", GRIDS)
def test_covariance_and_log_density_match_dense_normal(ndim, size):
    field = grf.GRF(ndim, size, grf.PowerLaw(-1.5, amplitude=2.0, cutoff=2.5), channels=2)
    cov = dense_covariance(field)
    np.testing.assert_allclose(field.covariance(), cov, rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(ndim * 10 + size)
    x = np.concatenate([field.sample(3, rng), rng.normal(size=(2, *field.shape))])  # on and off typical set
    ref = sum(multivariate_normal(np.zeros(len(cov)), cov).logpdf(x[:, c].reshape(len(x), -1)) for c in range(2))
    np.testing.assert_allclose(field.log_density(x), ref, rtol=0, atol=1e-8)
    assert field.point_variance() == pytest.approx(cov[0, 0], rel=1e-12)


def test_tabulated_power_law_equals_power_law():
    law = grf.PowerLaw(-2.0, amplitude=0.5, pivot=0.7)
    k = np.geomspace(2 * math.pi / 8, math.pi * math.sqrt(2), 5)
    table = grf.Tabulated(k=tuple(k), power=tuple(law(k)))
    a, b = grf.GRF(2, 8, law), grf.GRF(2, 8, table)
    np.testing.assert_allclose(b.power_full(), a.power_full(), rtol=1e-12)  # log-log interpolation is exact
    assert grf.grf_from_info(b.info()) == b and grf.grf_from_info(a.info()) == a


def test_generator_covariance_and_spectrum():
    field = grf.GRF(2, 4, grf.PowerLaw(-1.0, cutoff=3.0))
    num = 20000
    x = field.sample(num, np.random.default_rng(5))[:, 0].reshape(num, -1)
    exact = field.covariance()
    emp = x.T @ x / num  # mean is zero by construction of the reference
    # Var of the sample second moment of a zero-mean Gaussian pair: (C_ii C_jj + C_ij^2) / S.
    se = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / num)
    assert (np.abs(emp - exact) / se).max() < 5
    for ndim, size in ((1, 32), (3, 8)):
        f = grf.GRF(ndim, size, grf.PowerLaw(-2.0, cutoff=2.0), channels=2)
        c = grf.compare_spectrum(f.sample(400, np.random.default_rng(ndim)), f)
        assert np.all(np.abs(c.ratio - 1) < 5 * c.stderr_exact)
        assert c.chi2 < c.num_bins + 5 * math.sqrt(2 * c.num_bins)
        np.testing.assert_allclose(c.stderr, c.stderr_exact, rtol=0.35)  # empirical vs exact error


def test_generator_is_seeded():
    f = grf.GRF(2, 6, grf.PowerLaw(-1.0))
    a, b = (f.sample(3, np.random.default_rng(1)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, f.sample(3, np.random.default_rng(2)))


@pytest.mark.parametrize("ndim,size", [(1, 9), (2, 8), (3, 6)])
def test_estimator_single_mode(ndim, size):
    """x = A cos(k0.x) has x_hat = A N / 2 at +-k0, so the shell of |m0| holds total power
    sum |x_hat|^2 / N = A^2 N / 2 and every other shell none."""
    amp, m0 = 1.7, np.array([2, 1, 1][:ndim])
    pos = np.meshgrid(*[np.arange(size)] * ndim, indexing="ij")
    x = amp * np.cos(2 * math.pi * sum(mj * p for mj, p in zip(m0, pos)) / size)
    est = grf.binned_power(x[None, None], ndim)
    shell_k = 2 * math.pi * np.linalg.norm(m0) / size
    b = int(np.argmin(np.abs(est.k - shell_k)))
    total = est.power[0] * est.num_modes
    assert total[b] == pytest.approx(amp**2 * size**ndim / 2, rel=1e-10)
    np.testing.assert_allclose(np.delete(total, b), 0, atol=1e-9)
    assert est.num_modes.sum() == size**ndim


def test_estimator_white_noise():
    sigma = 0.6
    field = grf.GRF(2, 16, grf.PowerLaw(0.0, amplitude=sigma**2))  # P = sigma^2 everywhere
    x = np.random.default_rng(3).normal(0, sigma, size=(300, 1, 16, 16))
    c = grf.compare_spectrum(x, field)
    np.testing.assert_allclose(c.exact, sigma**2)
    assert np.all(np.abs(c.ratio - 1) < 5 * c.stderr_exact)
    # A field with twice the variance is caught: every shell off, chi-square huge.
    bad = grf.compare_spectrum(x * math.sqrt(2), field)
    assert bad.worst_relative_error == pytest.approx(1.0, abs=0.3) and bad.chi2 > 20 * bad.num_bins


def test_one_point_w1_and_ks():
    rng = np.random.default_rng(0)
    v = rng.normal(0.3, 1.2, size=500)
    grid = np.linspace(-12, 12, 400001)
    from scipy.special import ndtr
    emp = np.searchsorted(np.sort(v), grid, side="right") / len(v)
    numeric = np.trapezoid(np.abs(emp - ndtr(grid / 1.5)), grid)
    assert grf.w1_to_normal(v, 1.5) == pytest.approx(numeric, rel=1e-4)
    assert grf.w1_to_normal(v, 1.5) == pytest.approx(wasserstein1(v, rng.normal(0, 1.5, 400000)), abs=0.02)
    field = grf.GRF(2, 8, grf.PowerLaw(-1.0))
    op = grf.one_point(field.sample(500, rng), field)
    assert op["w1"] < 0.02 and op["ks"] < 0.02 and op["std"] == pytest.approx(op["exact_std"], rel=0.02)
    off = grf.one_point(field.sample(500, rng) * 1.3, field)
    assert off["w1"] > 5 * op["w1"] and off["ks"] > 5 * op["ks"]


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="ndim"):
        grf.GRF(4, 4, grf.PowerLaw(-1.0))
    with pytest.raises(ConfigError, match="amplitude"):
        grf.PowerLaw(-1.0, amplitude=0.0)
    with pytest.raises(ConfigError, match="spectrum-table covers"):
        grf.GRF(2, 8, grf.Tabulated(k=(1.0, 2.0), power=(1.0, 1.0)))
    sharp = grf.GRF(2, 8, grf.PowerLaw(-1.0, cutoff=1.0, cutoff_kind="sharp"))
    with pytest.raises(ConfigError, match="degenerate"):
        sharp.log_density(np.zeros((1, *sharp.shape)))


def test_cli_grf_shards_round_trip(tmp_path):
    out = tmp_path / "grf"
    argv = ["shards", "grf", "--ndim", "3", "--size", "4", "--spectral-index", "-2", "--cutoff", "2",
            "--num-samples", "24", "--channels", "2", "--samples-per-shard", "8", "--seed", "3", "--out", str(out)]
    assert pipeline_main(argv) == 0
    m = shards.read_manifest(out)
    assert m["meta"]["sample_shape"] == [2, 4, 4, 4] and m["meta"]["data_kind"] == "continuous"
    assert m["schema"]["npy"] == {"dtype": "float32", "shape": [2, 4, 4, 4]}
    field = grf.grf_from_info(m["info"]["grf"])
    assert field == grf.GRF(3, 4, grf.PowerLaw(-2.0, cutoff=2.0), channels=2) and m["info"]["seed"] == 3
    s = build_stream(DataConfig(train_urls=str(out), batch_per_rank=4, shuffle_buffer=8, label_key="log_likelihood"),
                     rank=0, world_size=1, seed=0)
    batch = next(s)
    s.close()
    assert tuple(batch["x"].shape) == (4, 2, 4, 4, 4) and batch["x"].dtype.is_floating_point
    # The stored log-likelihood is the exact one of the stored float32 field.
    np.testing.assert_allclose(batch["label"].numpy(), field.log_density(batch["x"].numpy().astype(np.float64)),
                               rtol=1e-5)
