"""Gaussian random fields on periodic grids in 1-3 dimensions, with exact references.

Conventions (lattice spacing 1, grid side L, N = L^d sites, x the site position):

* Fourier transform: numpy's unnormalised forward DFT, x_hat(k) = sum_x x(x) exp(-i k.x),
  taken with ``numpy.fft.rfftn`` over the d grid axes (``irfftn`` is its inverse, with 1/N).
  Wavevectors k = 2 pi m / L with integer m_j in numpy's ``fftfreq`` order; |m| is the
  wavevector length in units of the fundamental 2 pi / L.
* Spectrum: the covariance is C(x - y) = (1/N) sum_k P(k) exp(i k.(x - y)), so
  E[x_hat(k) conj(x_hat(k'))] = N P(k) delta_{k k'} and white noise of variance s^2 has
  P = s^2. This is the cosmologists' P(k) = <|delta_k|^2> / V with unit cell volume.
* Zero mode: a power law diverges (n < 0) or vanishes (n > 0) at k = 0, and P(0) = 0 would
  make the covariance singular. P(0) is therefore the power at the fundamental wavenumber
  2 pi / L unless ``zero_mode_power`` sets it; it is finite and > 0, so the density of the
  field is non-degenerate (unless a sharp cut-off zeroes modes; then the log-density refuses).
* Channels are independent fields with the same spectrum; samples are [S, C, L, ..., L].

Exact references: the circulant covariance C is diagonalised by the unitary DFT
U = F / sqrt(N) with eigenvalues P(k), so for one channel

    log p(x) = -1/2 (1/N) sum_k |x_hat(k)|^2 / P(k) - 1/2 sum_k log(2 pi P(k)),

summing over all N wavevectors of the full grid. On the rfft half grid every column
m_last not in {0, L/2} stands for itself and its conjugate (weight 2); the columns
m_last = 0 and (L even) m_last = L/2 hold all their conjugates already (weight 1). Every
site is N(0, C(0)) with C(0) = (1/N) sum_k P(k): the one-point distribution.

Power-spectrum estimator: P_hat(k) = |x_hat(k)|^2 / N per realisation, averaged over the
modes of a shell round(|m|) = b. Under the reference, pairs {k, -k} give |x_hat|^2 / (N P)
~ Exp(1) and self-conjugate modes ~ chi^2_1, so the variance of the shell sum is
2 sum_{k in shell} P(k)^2 over full-grid modes: the exact standard error used in the
chi-square over shells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

CUTOFF_KINDS = ("gaussian", "sharp")
MAX_DENSE_SITES = 4096  # exact dense covariance only for tiny grids (N^2 float64 entries)


# ----------------------------------------------------------------------------- spectra


@dataclass(frozen=True)
class PowerLaw:
    """P(k) = amplitude (k / pivot)^spectral_index times a high-k cut-off: exp(-(k/cutoff)^2)
    (``gaussian``) or 0 above ``cutoff`` (``sharp``); no cut-off when ``cutoff`` is None.
    Wavenumbers k in radians per lattice spacing (0 < k <= pi sqrt(d) on a grid)."""

    spectral_index: float
    amplitude: float = 1.0
    pivot: float = 1.0
    cutoff: float | None = None
    cutoff_kind: str = "gaussian"

    def __post_init__(self) -> None:
        if not math.isfinite(self.spectral_index):
            raise ConfigError(f"grf: --spectral-index must be finite, got {self.spectral_index}")
        for key, v in (("amplitude", self.amplitude), ("pivot", self.pivot)):
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"grf: --{key} must be finite and > 0, got {v}")
        if self.cutoff is not None and not (math.isfinite(self.cutoff) and self.cutoff > 0):
            raise ConfigError(f"grf: --cutoff must be finite and > 0 (or absent), got {self.cutoff}")
        if self.cutoff_kind not in CUTOFF_KINDS:
            raise ConfigError(f"grf: --cutoff-kind must be one of {CUTOFF_KINDS}, got {self.cutoff_kind!r}")

    def __call__(self, k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, dtype=np.float64)
        assert np.all(k > 0), "P(k) is evaluated at k > 0 only; the zero mode is set by GRF"
        p = self.amplitude * (k / self.pivot) ** self.spectral_index
        if self.cutoff is not None:
            p = p * (np.exp(-((k / self.cutoff) ** 2)) if self.cutoff_kind == "gaussian"
                     else (k <= self.cutoff))
        return p

    def info(self) -> dict[str, Any]:
        return {"kind": "power_law", "spectral_index": self.spectral_index, "amplitude": self.amplitude,
                "pivot": self.pivot, "cutoff": self.cutoff, "cutoff_kind": self.cutoff_kind}


@dataclass(frozen=True)
class Tabulated:
    """P(k) tabulated at increasing k > 0, interpolated linearly in (log k, log P): exact for
    a power law between nodes. Wavenumbers outside [k[0], k[-1]] are an error."""

    k: tuple[float, ...]
    power: tuple[float, ...]

    def __post_init__(self) -> None:
        k, p = np.asarray(self.k, dtype=np.float64), np.asarray(self.power, dtype=np.float64)
        if k.ndim != 1 or k.shape != p.shape or len(k) < 2:
            raise ConfigError(f"grf: --spectrum-table needs two columns k, P with >= 2 rows, got k {k.shape}, P {p.shape}")
        if not (np.all(np.isfinite(k)) and np.all(k > 0) and np.all(np.diff(k) > 0)):
            raise ConfigError("grf: --spectrum-table k must be finite, > 0 and strictly increasing")
        if not (np.all(np.isfinite(p)) and np.all(p > 0)):
            raise ConfigError("grf: --spectrum-table P(k) must be finite and > 0")

    def __call__(self, k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, dtype=np.float64)
        lo, hi = self.k[0], self.k[-1]
        # A relative tolerance: table nodes written as decimals of 2 pi m / L.
        if np.any(k < lo * (1 - 1e-12)) or np.any(k > hi * (1 + 1e-12)):
            raise ConfigError(
                f"grf: --spectrum-table covers k in [{lo}, {hi}], the grid needs "
                f"[{float(k.min())}, {float(k.max())}] (2 pi / L to pi sqrt(d))")
        return np.exp(np.interp(np.log(k), np.log(self.k), np.log(self.power)))

    def info(self) -> dict[str, Any]:
        return {"kind": "tabulated", "k": list(self.k), "power": list(self.power)}


def spectrum_from_info(d: dict[str, Any]) -> PowerLaw | Tabulated:
    """Rebuild a spectrum from its ``info()`` (as recorded in a shard manifest)."""
    d = dict(d)
    kind = d.pop("kind")
    if kind == "power_law":
        return PowerLaw(**d)
    if kind == "tabulated":
        return Tabulated(k=tuple(d["k"]), power=tuple(d["power"]))
    raise ConfigError(f"grf: unknown spectrum kind {kind!r}, expected power_law or tabulated")


# ------------------------------------------------------------------------------ fields


def _grid_m(ndim: int, size: int, *, half: bool) -> list[np.ndarray]:
    """Integer wavevector components m_j, broadcastable over the (rfft half) grid."""
    axes = [np.fft.fftfreq(size, 1.0 / size) for _ in range(ndim)]
    if half:
        axes[-1] = np.fft.rfftfreq(size, 1.0 / size)
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def half_grid_weights(ndim: int, size: int) -> np.ndarray:
    """How many full-grid modes each rfft half-grid mode stands for (1 or 2); see the
    module docstring. Sums of functions with f(k) = f(-k) over the full grid equal the
    weighted sums over the half grid."""
    w = np.full(size // 2 + 1, 2.0)
    w[0] = 1.0
    if size % 2 == 0:
        w[-1] = 1.0
    return np.broadcast_to(w, (size,) * (ndim - 1) + (size // 2 + 1,))


def mode_length(ndim: int, size: int, *, half: bool = True) -> np.ndarray:
    """|m| of every mode (wavevector length in units of 2 pi / L), on the half or full grid."""
    m = _grid_m(ndim, size, half=half)
    return np.sqrt(sum(mj**2 for mj in m))


@dataclass(frozen=True)
class GRF:
    """A real Gaussian random field on a periodic grid of side ``size`` in ``ndim`` dims."""

    ndim: int
    size: int
    spectrum: PowerLaw | Tabulated
    channels: int = 1
    zero_mode_power: float | None = None  # P(0); None: the power at k = 2 pi / L

    def __post_init__(self) -> None:
        if self.ndim not in (1, 2, 3):
            raise ConfigError(f"grf: --ndim must be 1, 2 or 3, got {self.ndim}")
        if self.size < 2:
            raise ConfigError(f"grf: --size must be >= 2, got {self.size}")
        if self.channels < 1:
            raise ConfigError(f"grf: --channels must be >= 1, got {self.channels}")
        p0 = self.zero_mode_power
        if p0 is not None and not (math.isfinite(p0) and p0 > 0):
            raise ConfigError(f"grf: --zero-mode-power must be finite and > 0 (or absent), got {p0}")
        if not self.power_half()[(0,) * self.ndim] > 0:
            raise ConfigError("grf: P at k = 2 pi / L is 0 (cut-off below the fundamental); set --zero-mode-power")

    @property
    def num_sites(self) -> int:
        return self.size**self.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels,) + (self.size,) * self.ndim

    def _power(self, m_len: np.ndarray) -> np.ndarray:
        k = 2 * math.pi * m_len / self.size
        out = np.empty_like(k)
        zero = m_len == 0
        out[~zero] = self.spectrum(k[~zero])
        p0 = self.zero_mode_power
        out[zero] = p0 if p0 is not None else float(self.spectrum(np.array([2 * math.pi / self.size]))[0])
        return out

    def power_half(self) -> np.ndarray:
        """Exact P on the rfft half grid [L, ..., L // 2 + 1], including P(0)."""
        return self._power(mode_length(self.ndim, self.size, half=True))

    def power_full(self) -> np.ndarray:
        """Exact P on the full grid [L, ..., L] (numpy's fftn order)."""
        return self._power(mode_length(self.ndim, self.size, half=False))

    def _axes(self) -> tuple[int, ...]:
        return tuple(range(-self.ndim, 0))

    def sample(self, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """[num_samples, C, L, ...] float64: x = irfftn(sqrt(P) rfftn(w)), w white N(0, 1)
        per site, whose E|w_hat|^2 = N gives E|x_hat|^2 = N P as the convention requires."""
        w = rng.standard_normal((num_samples, *self.shape))
        x_hat = np.fft.rfftn(w, axes=self._axes()) * np.sqrt(self.power_half())
        return np.fft.irfftn(x_hat, s=(self.size,) * self.ndim, axes=self._axes())

    def correlation(self) -> np.ndarray:
        """C(r) on the grid [L, ..., L]: (1/N) sum_k P(k) exp(i k.r) (real: P is even)."""
        return np.fft.ifftn(self.power_full()).real

    def point_variance(self) -> float:
        """Var x(site) = C(0) = (1/N) sum_k P(k): every site is N(0, C(0))."""
        return float(self.power_full().sum() / self.num_sites)

    def covariance(self) -> np.ndarray:
        """Dense covariance [N, N] of one channel's flattened sites (C order); tiny grids only."""
        n = self.num_sites
        assert n <= MAX_DENSE_SITES, f"dense covariance of {n} sites: use the FFT methods"
        pos = np.stack(np.unravel_index(np.arange(n), (self.size,) * self.ndim), axis=1)
        diff = (pos[:, None, :] - pos[None, :, :]) % self.size  # periodic x - y
        return self.correlation()[tuple(diff[..., j] for j in range(self.ndim))]

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Exact log p(x) in nats of fields x [S, C, L, ...] (summed over the C independent
        channels), by the FFT formula of the module docstring."""
        x = np.asarray(x, dtype=np.float64)
        if tuple(x.shape[1:]) != self.shape:
            raise ConfigError(f"grf: fields must have shape [S, {', '.join(map(str, self.shape))}], got {list(x.shape)}")
        p_half = self.power_half()
        if not np.all(p_half > 0):
            raise ConfigError(
                f"grf: the log-density needs P(k) > 0 on every mode; the spectrum is 0 on "
                f"{int((p_half == 0).sum())} modes (sharp --cutoff), so the field is degenerate")
        w = half_grid_weights(self.ndim, self.size)
        x_hat = np.fft.rfftn(x, axes=self._axes())
        quad = (w * np.abs(x_hat) ** 2 / p_half).sum(axis=self._axes()) / self.num_sites  # [S, C]
        log_det = float((w * np.log(2 * math.pi * p_half)).sum())
        return (-0.5 * quad - 0.5 * log_det).sum(axis=1)

    def nll_nats_per_dim(self, x: np.ndarray) -> float:
        """Mean exact negative log-likelihood of fields x in nats per dimension (C N values)."""
        return float(-self.log_density(x).mean() / (self.channels * self.num_sites))

    def info(self) -> dict[str, Any]:
        return {"ndim": self.ndim, "size": self.size, "channels": self.channels,
                "zero_mode_power": self.zero_mode_power, "spectrum": self.spectrum.info()}


def grf_from_info(d: dict[str, Any]) -> GRF:
    """Rebuild a field from its ``info()`` (as recorded in a shard manifest)."""
    return GRF(ndim=int(d["ndim"]), size=int(d["size"]), channels=int(d["channels"]),
               zero_mode_power=d["zero_mode_power"], spectrum=spectrum_from_info(d["spectrum"]))


# ------------------------------------------------------------------ power spectrum estimate


@dataclass(frozen=True)
class BinnedPower:
    """Shell-averaged power of R realisations: shell b holds the modes with round(|m|) = b."""

    k: np.ndarray  # [B] mean |k| of the shell's full-grid modes (radians per spacing)
    num_modes: np.ndarray  # [B] full-grid modes per shell
    power: np.ndarray  # [R, B] mean of |x_hat|^2 / N over the shell, per realisation


def binned_power(fields: np.ndarray, ndim: int) -> BinnedPower:
    """Isotropic power-spectrum estimate of periodic fields [..., L, ..., L] (the last
    ``ndim`` axes are the grid; every leading index is one realisation)."""
    x = np.asarray(fields, dtype=np.float64)
    size = x.shape[-1]
    assert x.ndim > ndim and x.shape[-ndim:] == (size,) * ndim, (x.shape, ndim)
    axes = tuple(range(-ndim, 0))
    p_hat = np.abs(np.fft.rfftn(x, axes=axes)) ** 2 / size**ndim
    p_hat = p_hat.reshape(-1, *p_hat.shape[-ndim:])
    w = half_grid_weights(ndim, size).ravel()
    m_len = mode_length(ndim, size, half=True).ravel()
    shell = np.rint(m_len).astype(np.int64)
    num_bins = int(shell.max()) + 1
    num_modes = np.bincount(shell, weights=w, minlength=num_bins)
    k_sum = np.bincount(shell, weights=w * m_len, minlength=num_bins)
    keep = num_modes > 0  # shells with no integer wavevector (possible in 3D) are dropped
    power = np.stack([np.bincount(shell, weights=w * p.ravel(), minlength=num_bins) for p in p_hat])
    return BinnedPower(
        k=(2 * math.pi / size) * k_sum[keep] / num_modes[keep],
        num_modes=num_modes[keep].astype(np.int64),
        power=power[:, keep] / num_modes[keep],
    )


@dataclass(frozen=True)
class SpectrumComparison:
    """Estimated vs exact shell power. ``ratio`` = mean estimate / exact; ``stderr`` its
    standard error across realisations, ``stderr_exact`` the one the reference implies
    (module docstring); ``chi2`` = sum over shells of ((ratio - 1) / stderr_exact)^2, about
    chi^2 with ``num_bins`` degrees of freedom under the reference (shells share no mode)."""

    k: np.ndarray
    num_modes: np.ndarray
    power: np.ndarray  # [B] mean estimate
    exact: np.ndarray  # [B]
    ratio: np.ndarray
    stderr: np.ndarray
    stderr_exact: np.ndarray
    chi2: float
    num_bins: int
    worst_bin: int  # index of the shell with the largest |ratio - 1|
    worst_relative_error: float

    def metrics(self) -> dict[str, float]:
        return {"chi2": self.chi2, "chi2_per_bin": self.chi2 / self.num_bins,
                "worst_relative_error": self.worst_relative_error,
                "worst_k": float(self.k[self.worst_bin])}


def compare_spectrum(fields: np.ndarray, field: GRF) -> SpectrumComparison:
    """Power spectrum of fields [S, C, L, ...] against ``field``'s exact spectrum per shell.
    Shells where the exact power is 0 (sharp cut-off) are left out of ratios and chi-square."""
    x = np.asarray(fields)
    if tuple(x.shape[1:]) != field.shape:
        raise ConfigError(f"grf: fields must have shape [S, {', '.join(map(str, field.shape))}], got {list(x.shape)}")
    est = binned_power(x, field.ndim)
    # The exact spectrum through the same estimator's bins: |x_hat|^2 / N -> P, P^2.
    w = half_grid_weights(field.ndim, field.size)
    shell = np.rint(mode_length(field.ndim, field.size, half=True)).astype(np.int64).ravel()
    p = field.power_half().ravel()
    n_all = np.bincount(shell, weights=w.ravel())
    keep = n_all > 0
    p_sum = np.bincount(shell, weights=w.ravel() * p)[keep]
    p2_sum = np.bincount(shell, weights=w.ravel() * p**2)[keep]
    num_real = est.power.shape[0]
    live = p_sum > 0
    exact = p_sum / est.num_modes
    mean = est.power.mean(axis=0)
    ratio = np.where(live, mean / np.where(live, exact, 1.0), np.nan)
    sd = est.power.std(axis=0, ddof=1) if num_real > 1 else np.full(len(mean), np.nan)
    stderr = np.where(live, sd / math.sqrt(num_real) / np.where(live, exact, 1.0), np.nan)
    stderr_exact = np.where(live, np.sqrt(2 * p2_sum) / np.where(live, p_sum, 1.0) / math.sqrt(num_real), np.nan)
    pull = (ratio[live] - 1) / stderr_exact[live]
    rel = np.abs(ratio - 1)
    worst = int(np.nanargmax(rel))
    return SpectrumComparison(
        k=est.k, num_modes=est.num_modes, power=mean, exact=exact, ratio=ratio, stderr=stderr,
        stderr_exact=stderr_exact, chi2=float((pull**2).sum()), num_bins=int(live.sum()),
        worst_bin=worst, worst_relative_error=float(rel[worst]),
    )


# ------------------------------------------------------------------ one-point distribution


def w1_to_normal(values: np.ndarray, sigma: float) -> float:
    """Exact 1-Wasserstein distance int |F_n(x) - Phi(x / sigma)| dx between the empirical
    distribution of ``values`` and N(0, sigma^2). Between order statistics F_n is constant
    c = i / n, and |c - Phi| changes sign at most once (at sigma Phi^-1(c)), so each piece
    integrates in closed form with G(x) = sigma (z Phi(z) + phi(z)), z = x / sigma, the
    antiderivative of Phi(x / sigma)."""
    from scipy.special import ndtr, ndtri

    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = len(v)
    assert n > 0 and sigma > 0

    def g(x):
        z = x / sigma
        return sigma * (z * ndtr(z) + np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi))

    def abs_int(c, a, b):  # int_a^b |c - Phi(t / sigma)| dt, elementwise
        q = np.clip(sigma * ndtri(c), a, b)  # where Phi = c, clipped into [a, b]
        below = c * (q - a) - (g(q) - g(a))  # Phi < c left of q
        above = (g(b) - g(q)) - c * (b - q)
        return below + above

    c = np.arange(1, n) / n
    inner = abs_int(c, v[:-1], v[1:]).sum() if n > 1 else 0.0
    tails = g(v[0]) + (g(v[-1]) - v[-1])  # int Phi below v_1, int (1 - Phi) above v_n
    return float(inner + tails)


def one_point(fields: np.ndarray, field: GRF) -> dict[str, float]:
    """The values at all sites against the exact one-point law N(0, C(0)): exact W1 (in units
    of the field) and the Kolmogorov-Smirnov distance. Sites of one field are correlated, so
    the KS p-value of independent draws would be wrong; only the distance is reported."""
    from scipy import stats

    v = np.asarray(fields, dtype=np.float64).ravel()
    sigma = math.sqrt(field.point_variance())
    return {"w1": w1_to_normal(v, sigma), "ks": float(stats.kstest(v, stats.norm(scale=sigma).cdf).statistic),
            "std": float(v.std()), "exact_std": sigma}
