"""Gaussian mixtures: samples of a density known exactly, and that density."""

from __future__ import annotations

import math

import numpy as np

from pipeline.data.meta import DataMeta
from pipeline.data.sources.base import SourceData, derived_seed


def gmm_params(dim: int, num_components: int, *, seed: int) -> dict[str, np.ndarray]:
    """Mixture weights, means [K, D] and full covariances [K, D, D] drawn from ``seed``."""
    rng = np.random.default_rng(derived_seed(seed, 1))
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = rng.normal(0.0, 3.0, size=(num_components, dim))
    a = rng.normal(0.0, 1.0, size=(num_components, dim, dim)) / math.sqrt(dim)
    # A A^T is positive semi-definite; + 0.1 I keeps it well conditioned.
    covs = a @ np.swapaxes(a, 1, 2) * 0.5 + 0.1 * np.eye(dim)
    return {"weights": weights, "means": means, "covariances": covs}


def gmm_log_prob(x: np.ndarray, weights, means, covariances) -> np.ndarray:
    """Exact log-density of a Gaussian mixture at x [N, D]:
    log sum_k w_k N(x; mu_k, Sigma_k), through a Cholesky factor and log-sum-exp."""
    x = np.asarray(x, dtype=np.float64)
    weights, means, covariances = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
    d = x.shape[1]
    comps = []
    for w, mu, cov in zip(weights, means, covariances):
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (x - mu).T)  # [D, N]; |z|^2 = Mahalanobis distance
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        comps.append(math.log(w) - 0.5 * (d * math.log(2 * math.pi) + log_det + (z**2).sum(0)))
    c = np.stack(comps)  # [K, N]
    m = c.max(0)
    return m + np.log(np.exp(c - m).sum(0))


def gmm(dim: int, num_components: int, num_samples: int, *, seed: int) -> SourceData:
    """Samples of a D-dimensional Gaussian mixture whose density is known exactly; the
    manifest records the parameters and the exact mean log-likelihood of the stored samples."""
    if dim < 1 or num_components < 1 or num_samples < 1:
        raise ValueError(
            f"gmm: --dim, --num-components and --num-samples must be >= 1, got "
            f"{dim}, {num_components}, {num_samples}"
        )
    p = gmm_params(dim, num_components, seed=seed)
    rng = np.random.default_rng(derived_seed(seed, 2))
    comp = rng.choice(num_components, size=num_samples, p=p["weights"])
    chols = np.linalg.cholesky(p["covariances"])
    eps = rng.normal(size=(num_samples, dim))
    x = p["means"][comp] + np.einsum("nij,nj->ni", chols[comp], eps)
    x = x.astype(np.float32)
    # Log-likelihood of the float32 values actually stored, not of the float64 draws.
    log_lik = gmm_log_prob(x, **p)
    return SourceData(
        x=x,
        meta=DataMeta(sample_shape=(dim,), data_kind="continuous"),
        json_columns={"component": comp.astype(np.int64), "log_likelihood": log_lik},
        info={
            "gmm": {k: v.tolist() for k, v in p.items()},
            "mean_log_likelihood": float(log_lik.mean()),
        },
    )
