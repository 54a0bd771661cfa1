"""Fréchet distance against independent computations, and the digits feature network."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from pipeline.eval.frechet import (
    CACHE_NAME,
    evaluate_digits,
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    load_or_train_digits_features,
)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _scipy_reference(mu1, s1, mu2, s2):
    # The usual FID formula with a general matrix square root (Heusel et al. 2017).
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("d", [1, 2, 5, 12])
def test_matches_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_reference(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)


def test_diagonal_closed_form():
    # Commuting (diagonal) covariances: d^2 = |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.5])
    expected = 1 + 4 + 0.25 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_identical_sets_zero_shifted_sets_larger():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance_of(f, f) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([0.5, 0, 0, 0, 0, 0])
    # A pure shift keeps the covariance: d^2 = |shift|^2 exactly.
    assert frechet_distance_of(f, f + shift) == pytest.approx(0.25, rel=1e-8)
    assert frechet_distance_of(f, f + 2 * shift) > frechet_distance_of(f, f + shift)


def test_feature_statistics_and_shape_errors():
    f = np.arange(12.0).reshape(4, 3)
    mu, cov = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(cov, np.cov(f.T))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_digits_features_real_vs_real_small_and_cached(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    net = load_or_train_digits_features(tmp_path)
    assert (tmp_path / CACHE_NAME).is_file()
    assert net.heldout_accuracy > 0.9
    again = load_or_train_digits_features(tmp_path)  # from the cache: identical weights
    np.testing.assert_array_equal(again.w1, net.w1)

    images = d.images[:, None]  # [N, 1, 8, 8], as stored in shards
    real = evaluate_digits(images[:900], images[900:], net, labels=d.target[:900])
    assert real.flags == []
    assert real.class_accuracy_generated > 0.9
    assert real.frechet_distance < 3 * real.frechet_distance_baseline
    # A degraded "generator" (blurred brightness shift) is far away and flagged.
    shifted = np.clip(images[:900] + 5, 0, 16)
    bad = evaluate_digits(shifted, images[900:], net)
    assert bad.frechet_distance > 10 * real.frechet_distance
    assert bad.flags
    # Labels that do not match the images: class accuracy ~ chance.
    wrong = evaluate_digits(images[:900], images[900:], net, labels=(d.target[:900] + 1) % 10)
    assert wrong.class_accuracy_generated < 0.2 and wrong.flags
