"""Physical observables of batches of 2D Ising lattices, for evaluating generated samples.

Inputs are numpy arrays or torch tensors of shape [N, L, L] or [N, 1, L, L] with values
+1/-1 (use ``to_spins`` first for continuous model output). Lattices are periodic, J = 1,
k_B = 1, with the energy convention of ``pipeline.physics.ising``:
E(s) = -sum_{i,j} s[i,j] (s[i,j+1] + s[i+1,j]). "Per spin" means divided by the number of
sites L^2. Fluctuation observables (specific heat, susceptibility, correlations) are
ensemble averages over the batch; the optional ``weights`` (non-negative, normalised here)
turn them into exact expectations over an enumerated state space or reweighted samples.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from pipeline.arrays import as_numpy


def _as_batch(lattices) -> np.ndarray:
    """[N, L, L] or [N, 1, L, L] -> float64 [N, H, W]; checks values are +1/-1."""
    x = as_numpy(lattices)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"lattices must have shape [N, L, L] or [N, 1, L, L] with N >= 1, L >= 2; got {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.abs(x) == 1.0):
        raise ValueError("lattices must hold spins +1/-1; map continuous model output with to_spins() first")
    return x


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _normalised_weights(weights, num_lattices: int) -> np.ndarray:
    if weights is None:
        return np.full(num_lattices, 1.0 / num_lattices)
    w = as_numpy(weights).astype(np.float64).reshape(-1)
    if w.shape[0] != num_lattices or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {num_lattices} finite non-negative numbers with a positive sum")
    return w / w.sum()


def to_spins(x) -> np.ndarray:
    """Map continuous values (e.g. a generator's output in [-1, 1]) to spins: sign, 0 -> +1.

    Returns int8 with the input's shape (a [N, 1, L, L] batch stays 4-D; the observables
    accept both layouts).
    """
    x = as_numpy(x)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot map non-finite values (NaN/Inf) to spins")
    return np.where(x >= 0, 1, -1).astype(np.int8)


def energy_per_spin(lattices) -> np.ndarray:
    """E/L^2 of each lattice, float64 [N]. All-up: -2; checkerboard: +2."""
    s = _as_batch(lattices)
    bonds = s * (np.roll(s, -1, axis=2) + np.roll(s, -1, axis=1))
    return -bonds.sum(axis=(1, 2)) / (s.shape[1] * s.shape[2])


def magnetisation(lattices) -> np.ndarray:
    """Signed magnetisation per spin m = (1/L^2) sum_i s_i of each lattice, float64 [N]."""
    return _as_batch(lattices).mean(axis=(1, 2))


def abs_magnetisation(lattices) -> np.ndarray:
    """|m| of each lattice, float64 [N]."""
    return np.abs(magnetisation(lattices))


def _weighted_variance(values: np.ndarray, w: np.ndarray) -> float:
    mean = float(np.sum(w * values))
    return float(np.sum(w * (values - mean) ** 2))


def specific_heat(lattices, temperature: float, *, weights=None) -> float:
    """Specific heat per spin from energy fluctuations: C/N = (<E^2> - <E>^2) / (N T^2).

    With e = E/N this is N Var(e) / T^2 (fluctuation-dissipation: C = dU/dT = Var(E)/T^2).
    """
    t = _check_temperature(temperature)
    s = _as_batch(lattices)
    w = _normalised_weights(weights, s.shape[0])
    num_sites = s.shape[1] * s.shape[2]
    return num_sites * _weighted_variance(energy_per_spin(s), w) / t**2


def susceptibility(lattices, temperature: float, *, use_abs: bool = False, weights=None) -> float:
    """Magnetic susceptibility per spin from fluctuations: chi = N (<m^2> - <m>^2) / T.

    With ``use_abs=False`` this is the zero-field linear response d<m>/dh of the finite
    lattice (fluctuation-dissipation). On a finite lattice below T_c, <m> = 0 by symmetry
    and this grows like N; ``use_abs=True`` gives the usual finite-size estimator
    N (<m^2> - <|m|>^2) / T, which stays finite in the ordered phase (Binder & Heermann,
    *Monte Carlo Simulation in Statistical Physics*; Newman & Barkema, *Monte Carlo Methods
    in Statistical Physics*, sec. 3.7).
    """
    t = _check_temperature(temperature)
    s = _as_batch(lattices)
    w = _normalised_weights(weights, s.shape[0])
    m = magnetisation(s)
    if use_abs:
        m = np.abs(m)
    return s.shape[1] * s.shape[2] * _weighted_variance(m, w) / t


def _structure_factor(s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """S(k) = <|sum_x s_x exp(-i k.x)|^2> / N on the lattice's Fourier grid, [H, W]."""
    power = np.abs(np.fft.fft2(s, axes=(1, 2))) ** 2
    return np.tensordot(w, power, axes=(0, 0)) / (s.shape[1] * s.shape[2])


def two_point_correlation(lattices, *, connected: bool = False, weights=None) -> np.ndarray:
    """G(r) = <s_x s_{x + r e}> for r = 0 .. L//2, averaged over sites x and both axes e.

    Computed for all displacements at once by the Wiener-Khinchin theorem (the inverse FFT
    of the structure factor is the periodic autocorrelation). ``connected=True`` subtracts
    <m^2> (per-lattice mean, averaged), i.e. G(r) - G(infinity) of a finite ordered lattice.
    Requires a square lattice. Returns float64 [L//2 + 1].
    """
    s = _as_batch(lattices)
    size = s.shape[1]
    if s.shape[2] != size:
        raise ValueError(f"two_point_correlation needs square lattices, got {s.shape[1]}x{s.shape[2]}")
    w = _normalised_weights(weights, s.shape[0])
    autocorrelation = np.fft.ifft2(_structure_factor(s, w)).real  # [dy, dx], average over x
    r = np.arange(size // 2 + 1)
    g = 0.5 * (autocorrelation[r, 0] + autocorrelation[0, r])
    if connected:
        g = g - float(np.sum(w * magnetisation(s) ** 2))
    return g


def correlation_length(lattices, *, weights=None) -> float:
    """Second-moment correlation length xi_2nd of square periodic lattices.

        xi = sqrt(S(0) / S(k_min) - 1) / (2 sin(k_min / 2)),  k_min = 2 pi / L,
    with S(k) the structure factor, S(k_min) averaged over the two axes.
    Cooper, Freedman & Preston, Nucl. Phys. B 210, 210 (1982); Caracciolo et al.,
    PRL 74, 2969 (1995); Salas & Sokal, J. Stat. Phys. 98, 551 (2000).
    It is the finite-lattice analogue of xi^2 = sum_r r^2 G(r) / (2 d sum_r G(r)); it is
    meaningful in the disordered phase and at T_c (where it scales like L). Returns 0 if
    S(k_min) >= S(0) (no ferromagnetic correlation beyond the lattice spacing) and inf
    for a uniform ensemble (S(k_min) = 0 < S(0)).
    """
    s = _as_batch(lattices)
    size = s.shape[1]
    if s.shape[2] != size:
        raise ValueError(f"correlation_length needs square lattices, got {s.shape[1]}x{s.shape[2]}")
    w = _normalised_weights(weights, s.shape[0])
    sf = _structure_factor(s, w)
    s0 = sf[0, 0]
    s_kmin = 0.5 * (sf[0, 1] + sf[1, 0])
    tiny = 1e-12 * s.shape[1] * s.shape[2]  # FFT round-off of an exactly vanishing S(k)
    if s_kmin <= tiny:
        # No weight at k_min: a uniform (ordered) ensemble has xi = inf; one with no weight
        # at k = 0 either (e.g. a perfect antiferromagnet) has no ferromagnetic correlations.
        return math.inf if s0 > tiny else 0.0
    ratio = s0 / s_kmin - 1.0
    if ratio <= 0:
        return 0.0
    return math.sqrt(ratio) / (2.0 * math.sin(math.pi / size))


def _sample_1d(x, name: str) -> np.ndarray:
    a = as_numpy(x).astype(np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a non-empty sample of finite numbers")
    return a


def wasserstein1(a, b) -> float:
    """1-Wasserstein distance between the empirical distributions of 1-D samples a and b.

    In 1-D, W1 = int |F_a(x) - F_b(x)| dx (Vallender 1974), evaluated exactly on the merged
    sorted support where both empirical CDFs are step functions.
    """
    a = np.sort(_sample_1d(a, "a"))
    b = np.sort(_sample_1d(b, "b"))
    support = np.concatenate([a, b])
    support.sort()
    widths = np.diff(support)
    left = support[:-1]
    cdf_a = np.searchsorted(a, left, side="right") / a.size
    cdf_b = np.searchsorted(b, left, side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def two_sample_pvalue(a, b) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test that a and b share a distribution.

    Exact for continuous distributions; for discrete observables (energies of small
    lattices take few values) the test is conservative.
    """
    return float(stats.ks_2samp(_sample_1d(a, "a"), _sample_1d(b, "b")).pvalue)
