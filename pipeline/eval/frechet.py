"""Fréchet distance between feature statistics, and a small digits classifier to supply the
features: an FID analogue (Heusel et al., NeurIPS 2017) that needs no download.

The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is
(Dowson & Landau, J. Multivariate Anal. 12, 450 (1982)):

    d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^{1/2} S2 S1^{1/2})^{1/2}.

The trace term is computed from the symmetric positive semi-definite matrix
S1^{1/2} S2 S1^{1/2} by eigendecomposition (its eigenvalues are those of S1 S2), which is
stable and real, instead of a general matrix square root of the non-symmetric S1 S2.

Features: the hidden-layer activations of a one-hidden-layer MLP trained on scikit-learn's
bundled 8x8 digits (values 0..16). It is trained once per run directory and its weights
cached there as a plain .npz (no pickle), so later evaluations reuse the same features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased) of features [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)  # symmetrise round-off
    r1 = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    d2 = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d2, 0.0)  # round-off can push an exact 0 slightly negative


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# ----------------------------------------------------------------------------------------
# The digits feature network


CACHE_NAME = "digits_features.npz"
_CACHE_VERSION = 1
DIGITS_MAX_VALUE = 16.0  # sklearn digits hold integers 0..16


@dataclass
class DigitsFeatures:
    """One-hidden-layer ReLU MLP on 8x8 digits: features(x) = relu(x/16 W1 + b1)."""

    w1: np.ndarray  # [64, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, 10]
    b2: np.ndarray  # [10]
    heldout_accuracy: float  # on the 20% of sklearn digits it was not trained on

    def _inputs(self, images) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64)
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.shape[1:] != (8, 8):
            raise ValueError(f"digit images must be [N, 8, 8] or [N, 1, 8, 8], got {x.shape}")
        return x.reshape(len(x), 64) / DIGITS_MAX_VALUE

    def features(self, images) -> np.ndarray:
        return np.maximum(self._inputs(images) @ self.w1 + self.b1, 0.0)

    def predict(self, images) -> np.ndarray:
        return np.argmax(self.features(images) @ self.w2 + self.b2, axis=1)


def train_digits_features(*, hidden: int = 64, seed: int = 0) -> DigitsFeatures:
    """Train the feature MLP on scikit-learn's bundled digits (a second or two on a CPU)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    d = load_digits()
    x = d.images.reshape(len(d.images), 64) / DIGITS_MAX_VALUE
    y = d.target
    perm = np.random.default_rng(seed).permutation(len(x))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=500, random_state=seed, alpha=1e-3)
    clf.fit(x[tr], y[tr])
    return DigitsFeatures(
        w1=clf.coefs_[0], b1=clf.intercepts_[0], w2=clf.coefs_[1], b2=clf.intercepts_[1],
        heldout_accuracy=float(clf.score(x[te], y[te])),
    )


def load_or_train_digits_features(cache_dir: Path) -> DigitsFeatures:
    """The cached feature network in ``cache_dir`` (trained and written there if absent)."""
    path = Path(cache_dir) / CACHE_NAME
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) == _CACHE_VERSION:
                return DigitsFeatures(w1=z["w1"], b1=z["b1"], w2=z["w2"], b2=z["b2"],
                                      heldout_accuracy=float(z["heldout_accuracy"]))
    net = train_digits_features()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, version=_CACHE_VERSION, w1=net.w1, b1=net.b1, w2=net.w2, b2=net.b2,
             heldout_accuracy=net.heldout_accuracy)
    tmp.replace(path)
    return net


# ----------------------------------------------------------------------------------------
# Report


@dataclass
class DigitsReport:
    frechet_distance: float  # generated vs reference, in the classifier's feature space
    frechet_distance_baseline: float  # two disjoint subsets of the reference: the noise floor
    classifier_heldout_accuracy: float  # of the feature network on real digits
    class_accuracy_generated: float | None  # conditional models: predicted class == requested
    num_generated: int
    num_reference: int
    flags: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_digits(generated, reference, net: DigitsFeatures, *, labels=None, seed: int = 0,
                    max_ratio: float = 10.0) -> DigitsReport:
    """Fréchet distance of generated vs reference digits in ``net``'s feature space. The
    baseline is the distance between two disjoint random subsets of the reference, the first
    as large as the generated set: what a perfect sampler would score up to noise. Flags an FD more than
    ``max_ratio`` times the baseline, and, for conditional samples, class accuracy below 50%."""
    fg, fr = net.features(generated), net.features(reference)
    if len(fr) < 4:
        raise ValueError(f"need at least 4 reference images for a baseline, got {len(fr)}")
    # The estimator's bias falls like 1/n, so the baseline uses as many real images in its
    # first set as were generated (at most half the reference), the rest in the second.
    perm = np.random.default_rng(seed).permutation(len(fr))
    k = max(2, min(len(fg), len(fr) // 2))
    baseline = frechet_distance_of(fr[perm[:k]], fr[perm[k:]])
    fd = frechet_distance_of(fg, fr)
    acc = None
    flags = []
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        acc = float(np.mean(net.predict(generated) == labels))
        if acc < 0.5:
            flags.append(f"conditional samples are classified as their requested digit only {acc:.0%} of the time")
    if math.isfinite(baseline) and fd > max_ratio * max(baseline, 1e-12):
        flags.append(f"Fréchet distance {fd:.3g} is more than {max_ratio:g}x the real-vs-real baseline {baseline:.3g}")
    return DigitsReport(
        frechet_distance=fd, frechet_distance_baseline=baseline,
        classifier_heldout_accuracy=net.heldout_accuracy, class_accuracy_generated=acc,
        num_generated=len(fg), num_reference=len(fr), flags=flags,
    )


__all__ = [
    "feature_statistics", "frechet_distance", "frechet_distance_of", "DigitsFeatures", "train_digits_features",
    "load_or_train_digits_features", "DigitsReport", "evaluate_digits",
]
