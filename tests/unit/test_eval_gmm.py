"""GMM evaluation: exact log-likelihood and mode coverage of a true and a collapsed sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.data.sources import gmm
from pipeline.eval.gmm import component_log_joint, differential_entropy_bits_per_dim, evaluate_gmm


@pytest.fixture(scope="module")
def data():
    """True samples: a reference set and an independent 'generated' set from the same mixture."""
    ref = gmm(3, 4, 4000, seed=5)
    params = {k: np.asarray(v) for k, v in ref.info["gmm"].items()}
    rng = np.random.default_rng(1)  # independent draws from the same mixture
    comp = rng.choice(4, size=3000, p=params["weights"])
    chol = np.linalg.cholesky(params["covariances"])
    x = params["means"][comp] + np.einsum("nij,nj->ni", chol[comp], rng.normal(size=(3000, 3)))
    return params, ref.x, x, comp


def test_component_densities_match_scipy(data):
    params, ref, _, _ = data
    x = ref[:50].astype(np.float64)
    joint = component_log_joint(x, params)
    for k in range(4):
        mvn = stats.multivariate_normal(params["means"][k], params["covariances"][k])
        np.testing.assert_allclose(joint[:, k], math.log(params["weights"][k]) + mvn.logpdf(x), rtol=1e-10)


def test_true_sampler_covers_every_mode_and_matches_likelihood(data):
    params, ref, x, _ = data
    r = evaluate_gmm(x, params, reference=ref)
    assert r.flags == []
    assert r.num_modes_covered == 4 and r.mode_coverage == 1.0
    assert abs(r.z_log_likelihood) < 4
    assert r.mode_weight_tv < 0.05


def test_collapsed_sampler_is_flagged(data):
    params, ref, x, comp = data
    k = int(np.argmax(params["weights"]))
    collapsed = x[comp == k]  # every sample from one component
    r = evaluate_gmm(collapsed, params, reference=ref)
    assert r.num_modes_covered == 1 and r.mode_coverage == 0.25
    assert any("mode collapse" in f for f in r.flags)
    assert r.mode_weight_tv > 0.3


def test_sampler_off_the_data_has_low_likelihood(data):
    params, ref, x, _ = data
    r = evaluate_gmm(x + 6.0, params, reference=ref)
    assert r.z_log_likelihood < -5
    assert any("below that of true samples" in f for f in r.flags)


def test_differential_entropy_of_single_gaussian():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.3], [0.3, 0.5]])
    params = {"weights": [1.0], "means": [[1.0, -1.0]], "covariances": [cov]}
    x = rng.multivariate_normal([1.0, -1.0], cov, size=20000)
    h, se = differential_entropy_bits_per_dim(x, params)
    exact = 0.5 * math.log((2 * math.pi * math.e) ** 2 * np.linalg.det(cov)) / (2 * math.log(2))
    assert abs(h - exact) < 4 * se and se < 0.01


def test_bad_input(data):
    params, ref, x, _ = data
    with pytest.raises(ValueError, match="samples must be"):
        evaluate_gmm(x[:, :2], params)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_gmm(np.full((4, 3), np.nan), params)
    with pytest.raises(ValueError, match="missing"):
        evaluate_gmm(x, {"weights": [1.0]})
