"""Real scalar phi^4 theory on a periodic 2D lattice: action, HMC sampler, observables and
the exact free field.

Action (Albergo, Kanwar, Shanahan 2019, arXiv:1904.12072, eq. 21), lattice units:

    S(phi) = sum_x [ -2 kappa sum_mu phi_x phi_{x+mu} + (1 - 2 lam) phi_x^2 + lam phi_x^4 ],

mu over the two positive directions. Observables (per configuration): the magnetisation
M = (1/V) sum_x phi_x; over an ensemble the susceptibility chi = V (<M^2> - <M>^2) (= sum_x
of the connected two-point function) and the two-point function G(x) = (1/V) sum_y
<phi_y phi_{y+x}>.

Free field (lam = 0): S = (1/2) phi^T A phi with A = 2 (1 - kappa (T + T^T)), T the sum of
the unit shifts, so A is diagonal in Fourier space: A(k) = 2 (1 - 2 kappa sum_mu cos k_mu)
at k_mu = 2 pi n_mu / L; the field is Gaussian with covariance A^-1, hence exactly
G(x) = (1/V) sum_k e^{i k.x} / A(k), chi = 1 / A(0) = 1 / (2 (1 - 4 kappa)) and, M being
normal with variance chi / V, <|M|> = sqrt(2 chi / (pi V)). Stable for kappa < 1/4.

Sampler: HMC (Duane et al. 1987): momenta p ~ N(0, 1), H = p^2 / 2 + S, ``num_leapfrog``
leapfrog steps of ``step_size``, Metropolis accept with min(1, e^{-dH}); vectorised over
``num_chains`` independent chains (numpy, float64). Burn-in first; then a pilot run measures
the integrated autocorrelation time of |M| (Sokal's automatic window, c = 5), and the
stored configurations are taken every ``thin = ceil(thin_factor * tau_int)`` trajectories.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Phi4:
    size: int  # lattice side L (periodic)
    kappa: float  # hopping parameter
    lam: float  # quartic coupling lambda

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"phi4: --size must be >= 1, got {self.size}")
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"phi4: --kappa must be finite and >= 0, got {self.kappa}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"phi4: --lam must be finite and >= 0, got {self.lam}")
        if self.lam == 0 and self.kappa >= 0.25:
            raise ValueError(f"phi4: the free field (--lam 0) is unstable for kappa >= 1/4 (A(k=0) = "
                             f"2 (1 - 4 kappa) <= 0), got --kappa {self.kappa}")

    @property
    def num_sites(self) -> int:
        return self.size * self.size

    def action(self, phi: np.ndarray) -> np.ndarray:
        """S of configurations phi [..., L, L]."""
        hop = phi * (np.roll(phi, -1, -1) + np.roll(phi, -1, -2))
        phi2 = phi * phi
        return (-2 * self.kappa * hop + (1 - 2 * self.lam) * phi2 + self.lam * phi2 * phi2).sum((-1, -2))

    def force(self, phi: np.ndarray) -> np.ndarray:
        """dS / dphi_x: each bond phi_x phi_{x+mu} appears for both of its sites."""
        neighbours = (np.roll(phi, -1, -1) + np.roll(phi, 1, -1) + np.roll(phi, -1, -2) + np.roll(phi, 1, -2))
        return -2 * self.kappa * neighbours + 2 * (1 - 2 * self.lam) * phi + 4 * self.lam * phi**3


# ------------------------------------------------------------------------------ HMC


HMC_STARTS = ("ordered", "random")


@dataclass(frozen=True)
class HMCConfig:
    step_size: float = 0.1
    num_leapfrog: int = 10
    num_chains: int = 64
    burn_in: int = 200  # trajectories discarded per chain
    pilot: int = 400  # trajectories per chain measuring tau_int of |M|
    thin_factor: float = 2.0  # configurations stored every ceil(thin_factor * tau_int) trajectories
    # How each chain starts: "ordered", phi = +-1 everywhere (the sign drawn per chain), or
    # "random", phi ~ N(0, 1) per site (a hot start). In the broken phase a hot start orders
    # in domains, and a chain whose domains close around the periodic lattice is left with a
    # pair of domain walls (a stripe), metastable for far longer than any burn-in: 3 of 64 hot
    # chains at L = 16, kappa = 0.35, lambda = 0.02 were still striped after 600 trajectories,
    # 28 of the 20000 stored fields (|M| ~ 0.5 instead of 3.2), which pulled the ensemble's
    # <|M|> down by 4.7 of its standard errors and made P(1, 0) 2.8x P(0, 1). An ordered start
    # has no walls to lose; in the symmetric phase it relaxes like any other start.
    start: str = "ordered"

    def __post_init__(self) -> None:
        if not (self.step_size > 0 and self.num_leapfrog >= 1 and self.num_chains >= 1 and self.burn_in >= 0
                and self.pilot >= 20 and self.thin_factor > 0):
            raise ValueError(f"phi4: HMC settings out of range (step size > 0, leapfrog, chains >= 1, "
                             f"burn-in >= 0, pilot >= 20, thin factor > 0): {self}")
        if self.start not in HMC_STARTS:
            raise ValueError(f"phi4: --start must be one of {', '.join(HMC_STARTS)}, got {self.start!r}")


def hmc_trajectory(theory: Phi4, phi: np.ndarray, cfg: HMCConfig, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One HMC trajectory of every chain in phi [C, L, L]; (new phi, accepted [C])."""
    p = rng.standard_normal(phi.shape)
    h0 = 0.5 * (p * p).sum((-1, -2)) + theory.action(phi)
    q = phi.copy()
    eps = cfg.step_size
    p = p - 0.5 * eps * theory.force(q)  # leapfrog: half kick, (drift, kick) ..., drift, half kick
    for i in range(cfg.num_leapfrog):
        q = q + eps * p
        p = p - (eps if i < cfg.num_leapfrog - 1 else 0.5 * eps) * theory.force(q)
    h1 = 0.5 * (p * p).sum((-1, -2)) + theory.action(q)
    d_h = np.nan_to_num(h1 - h0, nan=np.inf)  # an exploding trajectory is rejected
    accept = rng.random(len(phi)) < np.exp(-np.clip(d_h, -50, None))
    return np.where(accept[:, None, None], q, phi), accept


def integrated_autocorrelation_time(series: np.ndarray, c: float = 5.0) -> tuple[float, float]:
    """(tau_int, its standard error) of series [T, C] (C independent chains), with
    tau_int = 1/2 + sum_{t=1}^{W} rho(t) and Sokal's window: the smallest W >= c tau_int(W).
    The autocorrelation rho(t) is averaged over chains (each chain's own mean removed); the
    error is Madras-Sokal's tau sqrt(2 (2 W + 1) / (T C))."""
    x = np.asarray(series, dtype=np.float64)
    x = x - x.mean(0)
    num_t = x.shape[0]
    var = (x * x).mean()
    if var == 0:
        return 0.5, 0.0
    tau = 0.5
    for w in range(1, num_t // 2):
        tau += (x[:-w] * x[w:]).mean() / var
        if w >= c * tau:
            break
    tau = max(tau, 0.5)
    return tau, tau * math.sqrt(2 * (2 * w + 1) / (num_t * x.shape[1]))


@dataclass(frozen=True)
class HMCResult:
    configs: np.ndarray  # [S, L, L] float64
    chain: np.ndarray  # [S] chain of each configuration
    trajectory: np.ndarray  # [S] trajectory index (after burn-in and pilot) in its chain
    acceptance: float  # over burn-in, pilot and production
    tau_int: float  # of |M|, in trajectories, from the pilot run
    tau_int_stderr: float
    thin: int


def sample(theory: Phi4, num_samples: int, cfg: HMCConfig, rng: np.random.Generator) -> HMCResult:
    """``num_samples`` configurations: ``cfg.num_chains`` chains (``cfg.start``: ordered with a
    random sign per chain, or hot, N(0, 1) per site), burn-in, a pilot run for tau_int of |M|,
    then every ``thin``-th trajectory of each chain until ``num_samples`` are taken
    (chain-major order within a trajectory)."""
    chains = min(cfg.num_chains, num_samples)
    shape = (chains, theory.size, theory.size)
    if cfg.start == "ordered":
        phi = np.broadcast_to(rng.choice([-1.0, 1.0], size=chains)[:, None, None], shape).copy()
    else:
        phi = rng.standard_normal(shape)
    accepted = total = 0
    for _ in range(cfg.burn_in):
        phi, acc = hmc_trajectory(theory, phi, cfg, rng)
        accepted, total = accepted + acc.sum(), total + chains
    abs_m = np.empty((cfg.pilot, chains))
    for t in range(cfg.pilot):
        phi, acc = hmc_trajectory(theory, phi, cfg, rng)
        accepted, total = accepted + acc.sum(), total + chains
        abs_m[t] = np.abs(phi.mean((-1, -2)))
    tau, tau_err = integrated_autocorrelation_time(abs_m)
    thin = max(1, math.ceil(cfg.thin_factor * tau))
    rounds = -(-num_samples // chains)
    out, traj = [], []
    for r in range(rounds):
        for _ in range(thin):
            phi, acc = hmc_trajectory(theory, phi, cfg, rng)
            accepted, total = accepted + acc.sum(), total + chains
        out.append(phi.copy())
        traj.append(np.full(chains, (r + 1) * thin))
    configs = np.concatenate(out)[:num_samples]
    chain = np.tile(np.arange(chains), rounds)[:num_samples]
    return HMCResult(configs=configs, chain=chain, trajectory=np.concatenate(traj)[:num_samples],
                     acceptance=float(accepted / total), tau_int=tau, tau_int_stderr=tau_err, thin=thin)


# ------------------------------------------------------------------------ observables


def magnetisation(phi: np.ndarray) -> np.ndarray:
    """M = (1/V) sum_x phi_x per configuration of phi [N, L, L] (or [N, 1, L, L])."""
    return np.asarray(phi, dtype=np.float64).reshape(len(phi), -1).mean(1)


def abs_magnetisation(phi: np.ndarray) -> np.ndarray:
    return np.abs(magnetisation(phi))


def susceptibility(phi: np.ndarray) -> float:
    """chi = V (<M^2> - <M>^2) over the ensemble phi [N, (1,) L, L]."""
    m = magnetisation(phi)
    num_sites = np.asarray(phi[0]).size
    return float(num_sites * m.var())


def two_point(phi: np.ndarray) -> np.ndarray:
    """G(x) = (1/V) sum_y <phi_y phi_{y+x}> [L, L], from |phi_hat(k)|^2 (Wiener-Khinchin)."""
    phi = np.asarray(phi, dtype=np.float64)
    phi = phi.reshape(len(phi), *phi.shape[-2:])
    power = (np.abs(np.fft.fft2(phi)) ** 2).mean(0)
    return np.fft.ifft2(power).real / phi[0].size


def free_propagator_k(size: int, kappa: float) -> np.ndarray:
    """<|phi_hat(k)|^2> / V = 1 / A(k) = 1 / (2 (1 - 2 kappa sum_mu cos k_mu)) on the L x L
    momenta (np.fft order), for lam = 0."""
    k = 2 * math.pi * np.fft.fftfreq(size)
    a = 2 * (1 - 2 * kappa * (np.cos(k)[:, None] + np.cos(k)[None, :]))
    return 1.0 / a


def free_two_point(size: int, kappa: float) -> np.ndarray:
    """Exact G(x) [L, L] of the free field: (1/V) sum_k e^{i k.x} / A(k)."""
    return np.fft.ifft2(free_propagator_k(size, kappa)).real


def free_susceptibility(kappa: float) -> float:
    return 1.0 / (2 * (1 - 4 * kappa))


def free_abs_magnetisation(size: int, kappa: float) -> float:
    return math.sqrt(2 * free_susceptibility(kappa) / (math.pi * size * size))


def free_nll_nats_per_dim(size: int, kappa: float) -> float:
    """Exact entropy of the free field per site, nats: the mean -log p(phi) of N(0, A^-1),
    1/2 + log(2 pi) / 2 - (1 / 2V) sum_k log A(k) (E[S] = V / 2 by equipartition): what a
    likelihood model's negative ELBO per dimension is bounded by."""
    return 0.5 + 0.5 * math.log(2 * math.pi) + 0.5 * float(np.log(free_propagator_k(size, kappa)).mean())


def info(theory: Phi4, cfg: HMCConfig, result: HMCResult) -> dict:
    """The manifest's record: the theory, the sampler and its measured autocorrelation, and
    at lam = 0 the exact free-field references."""
    d = {"phi4": asdict(theory), "hmc": {**asdict(cfg), "acceptance": result.acceptance, "tau_int_abs_m":
                                         result.tau_int, "tau_int_abs_m_stderr": result.tau_int_stderr,
                                         "thin": result.thin}}
    if theory.lam == 0:
        d["free_field"] = {"susceptibility": free_susceptibility(theory.kappa),
                           "abs_magnetisation": free_abs_magnetisation(theory.size, theory.kappa),
                           "nll_nats_per_dim": free_nll_nats_per_dim(theory.size, theory.kappa)}
    return d
