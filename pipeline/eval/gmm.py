"""Evaluation against a Gaussian mixture whose density is known exactly.

``evaluate_gmm(samples, params, reference=...)``:
 - the exact log-likelihood of the generated samples under the true mixture
   (``pipeline.data.sources.gmm_log_prob``), against that of true samples. Its mean over
   true samples estimates -H (the negative differential entropy). Generated samples with a
   much lower mean are off the data; with a much higher mean they are too concentrated
   (e.g. a mode-seeking or collapsed sampler sits where the density is high), so both
   directions are flagged;
 - mode coverage: each sample is assigned to the component with the largest posterior
   responsibility w_k N(x; mu_k, S_k) / p(x); a component is covered when it receives at
   least ``min_fraction`` of the samples its weight leads one to expect. The total
   variation between the assigned proportions and the weights measures how well the
   sampler balances the modes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.data.sources import gmm_log_prob


def _params(params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        w = np.asarray(params["weights"], dtype=np.float64)
        mu = np.asarray(params["means"], dtype=np.float64)
        cov = np.asarray(params["covariances"], dtype=np.float64)
    except KeyError as e:
        raise ValueError(f"mixture parameters need weights, means and covariances; missing {e}") from None
    k, d = mu.shape
    if w.shape != (k,) or cov.shape != (k, d, d):
        raise ValueError(f"inconsistent mixture parameters: weights {w.shape}, means {mu.shape}, covariances {cov.shape}")
    return w, mu, cov


def component_log_joint(x: np.ndarray, params: dict) -> np.ndarray:
    """log w_k + log N(x; mu_k, S_k) for every sample and component, [N, K]; the per-component
    densities are those of ``gmm_log_prob`` with a single component of weight 1."""
    w, mu, cov = _params(params)
    return np.stack([math.log(wk) + gmm_log_prob(x, [1.0], mu[k:k + 1], cov[k:k + 1]) for k, wk in enumerate(w)], 1)


@dataclass
class GMMReport:
    mean_log_likelihood: float  # generated samples, nats per sample, under the true density
    mean_log_likelihood_stderr: float
    reference_mean_log_likelihood: float | None  # true samples (estimates -H)
    reference_mean_log_likelihood_stderr: float | None
    z_log_likelihood: float | None  # generated vs reference
    num_modes: int
    num_modes_covered: int
    mode_coverage: float  # num_modes_covered / num_modes
    mode_fractions: list[float]  # share of samples assigned to each component
    mode_weights: list[float]  # the true weights
    mode_weight_tv: float  # total variation between the two
    num_samples: int
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_gmm(samples, params: dict, *, reference=None, min_fraction: float = 0.1,
                 z_max: float = 5.0) -> GMMReport:
    """Exact log-likelihood and mode coverage of ``samples`` [N, D] under the mixture ``params``
    (weights [K], means [K, D], covariances [K, D, D], as in the shard manifest's info)."""
    x = np.asarray(samples, dtype=np.float64)
    w, mu, _ = _params(params)
    if x.ndim != 2 or x.shape[1] != mu.shape[1] or x.shape[0] < 2:
        raise ValueError(f"samples must be [N >= 2, {mu.shape[1]}], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or Inf")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    joint = component_log_joint(x, params)
    m = joint.max(1, keepdims=True)
    log_p = (m + np.log(np.exp(joint - m).sum(1, keepdims=True)))[:, 0]
    n = len(x)
    ll, ll_se = float(log_p.mean()), float(log_p.std(ddof=1) / math.sqrt(n))
    counts = np.bincount(joint.argmax(1), minlength=len(w))
    fractions = counts / n
    covered = counts >= min_fraction * w * n
    flags = []
    ref_ll = ref_se = z = None
    if reference is not None:
        r = gmm_log_prob(np.asarray(reference, dtype=np.float64), *_params(params))
        ref_ll, ref_se = float(r.mean()), float(r.std(ddof=1) / math.sqrt(len(r)))
        z = (ll - ref_ll) / math.hypot(ll_se, ref_se)
        if z < -z_max:
            flags.append(f"mean log-likelihood of samples {ll:.3f} is {-z:.1f} sigma below that of true samples "
                         f"{ref_ll:.3f}: samples fall where the true density is low")
        elif z > z_max:
            flags.append(f"mean log-likelihood of samples {ll:.3f} is {z:.1f} sigma above that of true samples "
                         f"{ref_ll:.3f}: samples are too concentrated (mode seeking or collapse)")
    if not covered.all():
        missing = [int(k) for k in np.flatnonzero(~covered)]
        flags.append(f"mode collapse: components {missing} of {len(w)} received fewer than {min_fraction:g} of the "
                     f"samples their weight implies")
    return GMMReport(
        mean_log_likelihood=ll, mean_log_likelihood_stderr=ll_se,
        reference_mean_log_likelihood=ref_ll, reference_mean_log_likelihood_stderr=ref_se, z_log_likelihood=z,
        num_modes=len(w), num_modes_covered=int(covered.sum()), mode_coverage=float(covered.mean()),
        mode_fractions=[float(f) for f in fractions], mode_weights=[float(v) for v in w],
        mode_weight_tv=float(0.5 * np.abs(fractions - w).sum()), num_samples=n, flags=flags,
    )


def differential_entropy_bits_per_dim(reference, params: dict) -> tuple[float, float]:
    """Monte-Carlo estimate (and standard error) of the true density's differential entropy
    per dimension in bits, -E[log2 p(x)] / D over true samples: the floor under a continuous
    VDM's bits/dim on held-out data (no model density can do better on average)."""
    x = np.asarray(reference, dtype=np.float64)
    lp = gmm_log_prob(x, *_params(params)) / (x.shape[1] * math.log(2))
    return float(-lp.mean()), float(lp.std(ddof=1) / math.sqrt(len(lp)))
