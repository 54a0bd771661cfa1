"""Classifier two-sample test: how well a small network tells generated samples from real
ones, as the area under its ROC curve on samples it was not trained on (the headline metric of
the CaloChallenge 2022, Krause et al., "A Community Challenge for Fast Calorimeter
Simulation"; Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests").

AUC = 0.5: the classifier cannot tell them apart (the best a generator can reach); 1: it
always can. Under the null (both sets from one distribution) the test AUC is the
Mann-Whitney statistic of two independent score sets, with standard error
sqrt((n1 + n2 + 1) / (12 n1 n2)) (Mann & Whitney 1947; ties aside): the noise level a
perfect generator still shows, reported next to the AUC.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np


def auc_null_stderr(n1: int, n2: int) -> float:
    """Standard error of the AUC of two independent samples of one distribution."""
    return math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def classifier_auc(real: np.ndarray, fake: np.ndarray, *, seed: int = 0, test_fraction: float = 0.5,
                   hidden: tuple[int, ...] = (64, 64), max_iter: int = 200) -> dict[str, Any]:
    """Train an MLP (features standardised on the training split) to tell ``real`` [n, F]
    from ``fake`` [m, F] and return its AUC on the held-out ``test_fraction`` of both.
    Equal counts: each set is cut to the smaller one (a random subset, seeded), so the
    classes are balanced; the split is stratified. Deterministic for a seed."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    assert real.ndim == 2 and fake.ndim == 2 and real.shape[1] == fake.shape[1], (real.shape, fake.shape)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = min(len(real), len(fake))
    n_test = int(round(test_fraction * n))
    if n_test < 2 or n - n_test < 2:
        raise ValueError(f"the classifier test needs >= 4 samples of each kind, got {len(real)} real, {len(fake)} fake")
    real, fake = real[rng.permutation(len(real))[:n]], fake[rng.permutation(len(fake))[:n]]
    x_train = np.concatenate([real[n_test:], fake[n_test:]])
    y_train = np.concatenate([np.ones(n - n_test), np.zeros(n - n_test)])
    x_test = np.concatenate([real[:n_test], fake[:n_test]])
    y_test = np.concatenate([np.ones(n_test), np.zeros(n_test)])
    scaler = StandardScaler().fit(x_train)
    clf = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-3, early_stopping=True, validation_fraction=0.2,
                        n_iter_no_change=10, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():  # a hard-to-fit pair (AUC near 0.5) may stop at max_iter: the AUC says so
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    scores = clf.predict_proba(scaler.transform(x_test))[:, 1]
    return {"auc": float(roc_auc_score(y_test, scores)), "auc_null_stderr": auc_null_stderr(n_test, n_test),
            "num_train": int(2 * (n - n_test)), "num_test": int(2 * n_test)}
