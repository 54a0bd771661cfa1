"""Derived views of training signals: running moments, per-t loss profiles, sampler ESS,
physics observables, throughput and memory. (The GAN balance flags are computed in D's
phase itself: :mod:`pipeline.objectives.gan.balance`.)

All helpers are plain numpy and take numpy arrays or torch tensors (converted on the host);
none of them talks to W&B or the file system -- the :class:`~pipeline.track.tracker.Tracker`
logs what they return.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np

from pipeline.arrays import as_numpy


# ---------------------------------------------------------------------------------------
# Running moments


class RunningMoments:
    """Streaming mean and variance (Welford 1962), fed by scalars or batches.

    A batch is folded in with the pairwise update of Chan, Golub & LeVeque (1979), so the
    result equals the two-pass variance of everything seen, without the catastrophic
    cancellation of the sum-of-squares formula when the mean is large (ELBOs in nats).
    Used for the variance of the per-sample ELBO estimate: ``sem`` is the standard error of
    its running mean.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the running mean

    def update(self, x: Any) -> None:
        v = as_numpy(x, np.float64).reshape(-1)
        v = v[np.isfinite(v)]  # a NaN sample is reported elsewhere; it must not poison this
        if v.size == 0:
            return
        self._combine(v.size, float(v.mean()), float(((v - v.mean()) ** 2).sum()))

    def merge(self, other: "RunningMoments") -> None:
        """Fold in another accumulator (e.g. gathered from another rank)."""
        if other.count:
            self._combine(other.count, other.mean, other._m2)

    def _combine(self, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        """Unbiased sample variance (ddof=1); NaN with fewer than two values."""
        return self._m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def var_population(self) -> float:
        return self._m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else math.nan

    @property
    def sem(self) -> float:
        """Standard error of the running mean."""
        return math.sqrt(self.var / self.count) if self.count > 1 else math.nan

    def reset(self) -> None:
        self.__init__()

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/mean": self.mean, f"{prefix}/std": self.std, f"{prefix}/sem": self.sem,
                f"{prefix}/count": float(self.count)}


# ---------------------------------------------------------------------------------------
# Per-t loss profile (VDM)


class TimeProfile:
    """Running mean of a per-sample loss in equal-width bins of the diffusion time t.

    Kingma et al. 2021 (VDM), Sec. 5 / Fig. 4: the variance of the diffusion loss depends on
    how its integral over t is sampled; the profile E[L | t] shows where the loss (and its
    variance) sits and is what an importance sampler for t adapts to.
    """

    def __init__(self, num_bins: int = 20, t_min: float = 0.0, t_max: float = 1.0) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not t_max > t_min:
            raise ValueError(f"need t_max > t_min, got t_min={t_min}, t_max={t_max}")
        self.num_bins, self.t_min, self.t_max = num_bins, float(t_min), float(t_max)
        self.reset()

    def reset(self) -> None:
        self.count = np.zeros(self.num_bins, np.int64)
        self._sum = np.zeros(self.num_bins)
        self._sum_sq = np.zeros(self.num_bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.t_min, self.t_max, self.num_bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    def bin_index(self, t: Any) -> np.ndarray:
        """Bin of each t: [edge_k, edge_k+1) with t_max in the last bin."""
        t = as_numpy(t, np.float64).reshape(-1)
        if t.size and (t.min() < self.t_min or t.max() > self.t_max):
            raise ValueError(f"t must lie in [{self.t_min}, {self.t_max}], got range [{t.min()}, {t.max()}]")
        idx = np.floor((t - self.t_min) / (self.t_max - self.t_min) * self.num_bins).astype(np.int64)
        return np.minimum(idx, self.num_bins - 1)

    def update(self, t: Any, loss: Any) -> None:
        t, loss = as_numpy(t, np.float64).reshape(-1), as_numpy(loss, np.float64).reshape(-1)
        if t.shape != loss.shape:
            raise ValueError(f"t and loss must have the same number of entries, got {t.size} and {loss.size}")
        keep = np.isfinite(loss)
        idx = self.bin_index(t[keep])
        loss = loss[keep]
        self.count += np.bincount(idx, minlength=self.num_bins)
        self._sum += np.bincount(idx, weights=loss, minlength=self.num_bins)
        self._sum_sq += np.bincount(idx, weights=loss * loss, minlength=self.num_bins)

    @property
    def mean(self) -> np.ndarray:
        """Mean loss per bin; NaN where a bin has no sample yet."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self._sum / np.maximum(self.count, 1), np.nan)

    @property
    def std(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            n = self.count
            var = (self._sum_sq - self._sum**2 / np.maximum(n, 1)) / np.maximum(n - 1, 1)
            return np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)

    def as_dict(self) -> dict[str, list]:
        """JSON-ready: bin centres, mean, std and count per bin (None for empty bins)."""

        def clean(a: np.ndarray) -> list:
            return [float(v) if np.isfinite(v) else None for v in a]

        return {"t": clean(self.centers), "mean": clean(self.mean), "std": clean(self.std),
                "count": [int(c) for c in self.count]}


# ---------------------------------------------------------------------------------------
# Time-step sampler


def effective_sample_size(weights: Any) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of importance weights."""
    w = as_numpy(weights, np.float64).reshape(-1)
    if w.size == 0 or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be a non-empty array of finite non-negative numbers")
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def sampler_ess_fraction(bin_probs: Any) -> float:
    """Expected ESS per sample of a time-step sampler over K equal-width bins of t.

    Sampling bin k with probability p_k instead of uniformly (1/K) needs importance weights
    w_k = 1 / (K p_k) for an unbiased ELBO. Then E_p[w] = 1 and E_p[w^2] = sum_k 1/(K^2 p_k),
    so ESS/N = E[w]^2 / E[w^2] = K^2 / sum_k (1/p_k): 1 for the uniform sampler, -> 0 as the
    sampler concentrates on few bins.
    """
    p = as_numpy(bin_probs, np.float64).reshape(-1)
    if p.size == 0 or np.any(p <= 0) or not np.all(np.isfinite(p)):
        raise ValueError("bin_probs must be finite and > 0 (a bin with p=0 makes the ELBO estimate biased)")
    p = p / p.sum()
    return float(p.size**2 / (1.0 / p).sum())


def sampler_metrics(bin_probs: Any, prefix: str = "vdm/p_t") -> dict[str, float]:
    """Scalars summarising a time-step distribution: ESS fraction, normalised entropy, max/min."""
    p = as_numpy(bin_probs, np.float64).reshape(-1)
    ess = sampler_ess_fraction(p)
    p = p / p.sum()
    entropy = float(-(p * np.log(p)).sum() / math.log(p.size)) if p.size > 1 else 1.0
    return {f"{prefix}/ess_fraction": ess, f"{prefix}/entropy_norm": entropy,
            f"{prefix}/max_over_min": float(p.max() / p.min())}


# ---------------------------------------------------------------------------------------
# Physics observables of samples vs reference data


def physics_metrics(samples: Any, reference: Any | None = None, prefix: str = "phys") -> dict[str, float]:
    """Energy per spin and |magnetisation| of ``samples`` (and ``reference``) lattices.

    Lattices are [N, L, L] or [N, 1, L, L]; continuous values (a generator's output) are
    mapped to spins by sign first, and lattices with NaN/Inf are left out and counted in
    ``{prefix}/nonfinite_lattices``. Per observable: the batch mean; with a reference also
    its mean and the W1 distance between the two per-lattice distributions (a mean can
    match while the distribution -- e.g. the two-peaked |m| near T_c -- does not).
    """
    from pipeline.physics.observables import abs_magnetisation, energy_per_spin, to_spins, wasserstein1  # lazy

    def lattices(x: Any) -> tuple[np.ndarray, int]:
        v = as_numpy(x, np.float64)
        if v.ndim == 4 and v.shape[1] == 1:
            v = v[:, 0]
        if v.ndim != 3:
            raise ValueError(f"lattices must have shape [N, L, L] or [N, 1, L, L], got {tuple(v.shape)}")
        finite = np.isfinite(v).all(axis=(1, 2))
        return to_spins(v[finite]), int((~finite).sum())

    gen, num_bad = lattices(samples)
    out: dict[str, float] = {f"{prefix}/nonfinite_lattices": float(num_bad)}
    if gen.shape[0] == 0:
        return out
    ref = lattices(reference)[0] if reference is not None else None
    for name, fn in (("energy_per_spin", energy_per_spin), ("abs_magnetisation", abs_magnetisation)):
        g = as_numpy(fn(gen), np.float64).reshape(-1)
        out[f"{prefix}/{name}"] = float(g.mean())
        if ref is not None and ref.shape[0]:
            r = as_numpy(fn(ref), np.float64).reshape(-1)
            out[f"{prefix}/{name}_ref"] = float(r.mean())
            out[f"{prefix}/{name}_w1"] = wasserstein1(g, r)
    return out


# ---------------------------------------------------------------------------------------
# Throughput and memory


class ThroughputMeter:
    """Samples/s, step time and data-wait time over the steps since the last ``metrics()``.

    ``step_s`` is the wall time of a whole optimizer step *including* ``data_wait_s`` (time
    blocked on the data loader), so ``perf/data_wait_fraction`` says how input-bound it is.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.num_steps = 0
        self.num_samples = 0
        self.step_s = 0.0
        self.data_wait_s = 0.0

    def update(self, num_samples: int, step_s: float, data_wait_s: float = 0.0) -> None:
        if step_s < 0 or data_wait_s < 0 or num_samples < 0:
            raise ValueError("num_samples, step_s and data_wait_s must be >= 0")
        self.num_steps += 1
        self.num_samples += num_samples
        self.step_s += step_s
        self.data_wait_s += data_wait_s

    def metrics(self, prefix: str = "perf") -> dict[str, float]:
        """Averages over the window, then start a new window. Empty window -> {}."""
        if self.num_steps == 0 or self.step_s <= 0:
            return {}
        out = {
            f"{prefix}/samples_per_s": self.num_samples / self.step_s,
            f"{prefix}/step_time_s": self.step_s / self.num_steps,
            f"{prefix}/data_wait_s": self.data_wait_s / self.num_steps,
            f"{prefix}/data_wait_fraction": self.data_wait_s / self.step_s,
        }
        self._reset()
        return out


class StepTimer:
    """Feeds a :class:`ThroughputMeter` from the loop: ``start_step()``, then
    ``add_data_wait(seconds)`` for time blocked on the loader, then ``end_step(num_samples)``."""

    def __init__(self, meter: ThroughputMeter) -> None:
        self.meter = meter
        self._t_step = None
        self._wait = 0.0

    def start_step(self) -> None:
        self._t_step = time.perf_counter()
        self._wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self._wait += seconds

    def end_step(self, num_samples: int) -> None:
        assert self._t_step is not None, "end_step() without start_step()"
        self.meter.update(num_samples, time.perf_counter() - self._t_step, self._wait)
        self._t_step = None


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc); peak RSS elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_metrics(prefix: str = "sys") -> dict[str, float]:
    """Host RSS, plus CUDA allocator peaks when torch is already imported and a GPU is used."""
    out = {f"{prefix}/rss_gib": rss_bytes() / 2**30}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{prefix}/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"{prefix}/cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out
