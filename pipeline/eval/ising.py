"""Physics evaluation of generated 2D Ising lattices: against Monte Carlo reference data and
against the exact solution.

``evaluate_ising(generated, reference, temperature)`` measures, on both sets of lattices,
the energy per spin, |magnetisation|, specific heat and susceptibility (from fluctuations),
the two-point correlation function and the second-moment correlation length; it computes
distances between the generated and reference distributions of the per-lattice observables
(Wasserstein-1 and the Kolmogorov-Smirnov two-sample p-value) and z-scores of every mean
against the reference and, where one exists, against the exact value. Anything beyond
``z_max`` sigma or below ``alpha`` in p-value is flagged.

Exact values (``pipeline.physics.ising``):
 - infinite lattice: Onsager's U(T) and C(T) (Onsager 1944), Yang's spontaneous |m|(T)
   (Yang 1952), Onsager's S(T);
 - the finite L x L periodic lattice: U, C and S from derivatives of Kaufman's exact
   partition function (Kaufman 1949), ``exact_finite_lattice``. These are what MC data of
   that lattice must reproduce (the infinite-lattice U differs by O(1/L^2) corrections away
   from T_c, and the finite-lattice C is finite at T_c).
There is no closed form for the finite-lattice |m|; above T_c the infinite-lattice value is
0 while a finite lattice has |m| = O(1/L) (here ~ sqrt(chi T / L^2)), so |m| is judged
against the reference data, never against Yang's value (a note says so).

Standard errors assume independent lattices. Generated samples are independent; reference
MC samples are stored every few cluster sweeps and are close to independent, but residual
autocorrelation would make the reference errors slightly optimistic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.arrays import as_numpy
from pipeline.physics import ising as exact
from pipeline.physics import observables as obs

DEFAULT_Z_MAX = 5.0  # flag a mean more than this many standard errors off
DEFAULT_ALPHA = 1e-3  # flag a two-sample test with a p-value below this


# ----------------------------------------------------------------------------------------
# Exact finite-lattice thermodynamics (Kaufman's partition function)


@dataclass(frozen=True)
class FiniteLatticeExact:
    energy_per_spin: float  # U/N = -(1/N) d ln Z / d beta
    specific_heat: float  # C/N = (beta^2 / N) d^2 ln Z / d beta^2
    entropy_per_spin: float  # S/N = (ln Z + beta U) / N, nats


def exact_finite_lattice(temperature: float, size: int) -> FiniteLatticeExact:
    """U, C and S per spin of the L x L periodic lattice, exactly, by differentiating
    ln Z(beta) of Kaufman (Phys. Rev. 76, 1232 (1949); ``exact_log_partition_function``).

    Derivatives are central differences in beta. ln Z is analytic in beta on a finite
    lattice, so the truncation error is O(h^2 d^3 ln Z): with h = 1e-4 beta (first) and
    1e-3 beta (second derivative) both it and the float64 round-off are below 1e-7 per spin.
    Tested against brute-force enumeration of a 4x4 lattice.
    """
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    n = size * size
    beta = 1.0 / t

    def log_z(b: float) -> float:
        return exact.exact_log_partition_function(1.0 / b, size, size)

    h1, h2 = 1e-4 * beta, 1e-3 * beta
    lz = log_z(beta)
    d1 = (log_z(beta + h1) - log_z(beta - h1)) / (2 * h1)
    d2 = (log_z(beta + h2) - 2 * lz + log_z(beta - h2)) / h2**2
    u = -d1 / n
    return FiniteLatticeExact(energy_per_spin=u, specific_heat=beta**2 * d2 / n, entropy_per_spin=(lz + beta * u * n) / n)


# ----------------------------------------------------------------------------------------
# Small statistics


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float


def mean_estimate(values: np.ndarray) -> Estimate:
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.inf
    return Estimate(float(v.mean()), se)


def variance_estimate(values: np.ndarray) -> Estimate:
    """Sample variance (1/n normalisation, as the observables use) and its asymptotic
    standard error sqrt((mu_4 - sigma^4) / n) (the delta method; e.g. Kendall & Stuart,
    *The Advanced Theory of Statistics*, vol. 1, sec. 10.5)."""
    v = np.asarray(values, dtype=np.float64)
    c = v - v.mean()
    var = float(np.mean(c**2))
    mu4 = float(np.mean(c**4))
    se = math.sqrt(max(mu4 - var**2, 0.0) / v.size) if v.size > 1 else math.inf
    return Estimate(var, se)


def z_score(a: Estimate, b: Estimate | float) -> float:
    """(a - b) in units of the combined standard error (b exact when a float)."""
    if isinstance(b, Estimate):
        diff, se = a.value - b.value, math.hypot(a.stderr, b.stderr)
    else:
        diff, se = a.value - b, a.stderr
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


# ----------------------------------------------------------------------------------------
# Observables of one ensemble


@dataclass
class IsingObservables:
    """Observables of one ensemble of lattices at temperature T."""

    num_lattices: int
    energy_per_spin: Estimate
    abs_magnetisation: Estimate
    specific_heat: Estimate  # C/N = N Var(e) / T^2
    susceptibility: Estimate  # chi = N Var(|m|) / T (finite-size estimator)
    correlation_function: np.ndarray  # G(r), r = 0 .. L//2
    correlation_length: float  # second-moment xi
    energies: np.ndarray  # per lattice, for distribution distances
    abs_magnetisations: np.ndarray


def measure(lattices, temperature: float) -> IsingObservables:
    """Observables of ``lattices`` ([N, L, L] or [N, 1, L, L], +1/-1) at ``temperature``."""
    s = _lattices(lattices)
    t = float(temperature)
    n_sites = s.shape[1] * s.shape[2]
    e = obs.energy_per_spin(s)
    am = obs.abs_magnetisation(s)
    var_e, var_m = variance_estimate(e), variance_estimate(am)
    # Same estimators as observables.specific_heat / susceptibility(use_abs=True), with errors.
    c = Estimate(n_sites * var_e.value / t**2, n_sites * var_e.stderr / t**2)
    chi = Estimate(n_sites * var_m.value / t, n_sites * var_m.stderr / t)
    return IsingObservables(
        num_lattices=s.shape[0],
        energy_per_spin=mean_estimate(e),
        abs_magnetisation=mean_estimate(am),
        specific_heat=c,
        susceptibility=chi,
        correlation_function=obs.two_point_correlation(s),
        correlation_length=obs.correlation_length(s),
        energies=e,
        abs_magnetisations=am,
    )


# ----------------------------------------------------------------------------------------
# The report


@dataclass
class IsingReport:
    temperature: float
    size: int
    num_generated: int
    num_reference: int
    # energy per spin: generated, reference MC, exact infinite lattice (Onsager), exact L x L (Kaufman)
    energy_per_spin: float
    energy_per_spin_stderr: float
    energy_reference: float
    energy_reference_stderr: float
    energy_exact: float
    energy_exact_finite: float
    # |m|: generated, reference, exact infinite lattice (Yang; 0 above T_c)
    abs_magnetisation: float
    abs_magnetisation_stderr: float
    abs_magnetisation_reference: float
    abs_magnetisation_reference_stderr: float
    magnetisation_exact: float
    # fluctuations
    specific_heat: float
    specific_heat_stderr: float
    specific_heat_reference: float
    specific_heat_reference_stderr: float
    specific_heat_exact: float  # infinite lattice (inf at T_c)
    specific_heat_exact_finite: float
    susceptibility: float
    susceptibility_stderr: float
    susceptibility_reference: float
    susceptibility_reference_stderr: float
    # correlations
    correlation_function: list[float]
    correlation_function_reference: list[float]
    correlation_function_max_abs_diff: float
    correlation_length: float
    correlation_length_reference: float
    # distribution distances, generated vs reference
    w1_energy: float
    w1_abs_magnetisation: float
    pvalue_energy: float
    pvalue_abs_magnetisation: float
    # z-scores (generated - target) / combined standard error
    z_energy_reference: float
    z_energy_exact_finite: float
    z_abs_magnetisation_reference: float
    z_specific_heat_reference: float
    z_specific_heat_exact_finite: float
    z_susceptibility_reference: float
    z_reference_energy_exact_finite: float  # the reference data's own check
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_ising(
    generated,
    reference,
    temperature: float,
    *,
    z_max: float = DEFAULT_Z_MAX,
    alpha: float = DEFAULT_ALPHA,
) -> IsingReport:
    """Compare generated lattices with reference lattices at ``temperature`` and with the
    exact solution. Both are [N, L, L] or [N, 1, L, L] arrays/tensors of +1/-1 (map
    continuous model output with ``pipeline.physics.observables.to_spins`` first)."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not z_max > 0 or not 0 < alpha < 1:
        raise ValueError(f"need z_max > 0 and 0 < alpha < 1, got z_max={z_max}, alpha={alpha}")
    generated, reference = _square_lattices_of_one_size(generated, reference)
    gen = measure(generated, t)
    ref = measure(reference, t)
    if gen.num_lattices < 2 or ref.num_lattices < 2:
        raise ValueError(
            f"need at least 2 generated and 2 reference lattices for fluctuations and errors, got "
            f"{gen.num_lattices} and {ref.num_lattices}"
        )
    size = generated.shape[1]
    fin = exact_finite_lattice(t, size)
    report = IsingReport(
        temperature=t,
        size=size,
        num_generated=gen.num_lattices,
        num_reference=ref.num_lattices,
        **_mean_fields(gen, ref, t, fin),
        **_correlation_fields(gen, ref),
        **_distance_fields(gen, ref),
        **_z_fields(gen, ref, fin),
    )
    report.flags = _flags(report, z_max, alpha)
    report.notes = _notes(report)
    return report


def _square_lattices_of_one_size(generated, reference) -> tuple[np.ndarray, np.ndarray]:
    generated, reference = _lattices(generated), _lattices(reference)
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"generated lattices are {generated.shape[1:]} but the reference lattices are "
            f"{reference.shape[1:]}; compare lattices of one size"
        )
    if generated.shape[2] != generated.shape[1]:
        raise ValueError(f"lattices must be square, got {generated.shape[1:]}")
    return generated, reference


def _mean_fields(gen: IsingObservables, ref: IsingObservables, t: float, fin: FiniteLatticeExact) -> dict:
    """The report's means and fluctuations: generated, reference and exact."""
    return dict(
        energy_per_spin=gen.energy_per_spin.value,
        energy_per_spin_stderr=gen.energy_per_spin.stderr,
        energy_reference=ref.energy_per_spin.value,
        energy_reference_stderr=ref.energy_per_spin.stderr,
        energy_exact=float(exact.exact_energy_per_spin(t)),
        energy_exact_finite=fin.energy_per_spin,
        abs_magnetisation=gen.abs_magnetisation.value,
        abs_magnetisation_stderr=gen.abs_magnetisation.stderr,
        abs_magnetisation_reference=ref.abs_magnetisation.value,
        abs_magnetisation_reference_stderr=ref.abs_magnetisation.stderr,
        magnetisation_exact=float(exact.exact_magnetisation(t)),
        specific_heat=gen.specific_heat.value,
        specific_heat_stderr=gen.specific_heat.stderr,
        specific_heat_reference=ref.specific_heat.value,
        specific_heat_reference_stderr=ref.specific_heat.stderr,
        specific_heat_exact=float(exact.exact_specific_heat(t)),
        specific_heat_exact_finite=fin.specific_heat,
        susceptibility=gen.susceptibility.value,
        susceptibility_stderr=gen.susceptibility.stderr,
        susceptibility_reference=ref.susceptibility.value,
        susceptibility_reference_stderr=ref.susceptibility.stderr,
    )


def _correlation_fields(gen: IsingObservables, ref: IsingObservables) -> dict:
    return dict(
        correlation_function=[float(v) for v in gen.correlation_function],
        correlation_function_reference=[float(v) for v in ref.correlation_function],
        correlation_function_max_abs_diff=float(np.max(np.abs(gen.correlation_function - ref.correlation_function))),
        correlation_length=gen.correlation_length,
        correlation_length_reference=ref.correlation_length,
    )


def _distance_fields(gen: IsingObservables, ref: IsingObservables) -> dict:
    """Distances between the per-lattice distributions, generated vs reference."""
    return dict(
        w1_energy=obs.wasserstein1(gen.energies, ref.energies),
        w1_abs_magnetisation=obs.wasserstein1(gen.abs_magnetisations, ref.abs_magnetisations),
        pvalue_energy=obs.two_sample_pvalue(gen.energies, ref.energies),
        pvalue_abs_magnetisation=obs.two_sample_pvalue(gen.abs_magnetisations, ref.abs_magnetisations),
    )


def _z_fields(gen: IsingObservables, ref: IsingObservables, fin: FiniteLatticeExact) -> dict:
    return dict(
        z_energy_reference=z_score(gen.energy_per_spin, ref.energy_per_spin),
        z_energy_exact_finite=z_score(gen.energy_per_spin, fin.energy_per_spin),
        z_abs_magnetisation_reference=z_score(gen.abs_magnetisation, ref.abs_magnetisation),
        z_specific_heat_reference=z_score(gen.specific_heat, ref.specific_heat),
        z_specific_heat_exact_finite=z_score(gen.specific_heat, fin.specific_heat),
        z_susceptibility_reference=z_score(gen.susceptibility, ref.susceptibility),
        z_reference_energy_exact_finite=z_score(ref.energy_per_spin, fin.energy_per_spin),
    )


def _lattices(x) -> np.ndarray:
    """[N, L, L] int8 from a numpy array or torch tensor [N, L, L] / [N, 1, L, L] of +-1."""
    x = as_numpy(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"lattices must have shape [N, L, L] or [N, 1, L, L] with L >= 2, got {x.shape}")
    if not np.all(np.abs(x) == 1):
        raise ValueError("lattices must hold spins +1/-1; map continuous model output with to_spins() first")
    return x.astype(np.int8)


def _flags(r: IsingReport, z_max: float, alpha: float) -> list[str]:
    at = f"T={r.temperature:g}"
    flags = []

    def z_flag(z: float, what: str, gen: float, gen_se: float, target: str) -> None:
        if abs(z) > z_max:
            flags.append(f"{at}: {what} off by {abs(z):.1f} sigma (more than {z_max:g}) from {target} "
                         f"(generated {gen:.4g} +- {gen_se:.2g})")

    z_flag(r.z_energy_reference, "energy per spin", r.energy_per_spin, r.energy_per_spin_stderr,
           f"the reference {r.energy_reference:.4g} +- {r.energy_reference_stderr:.2g}")
    z_flag(r.z_energy_exact_finite, "energy per spin", r.energy_per_spin, r.energy_per_spin_stderr,
           f"the exact {r.size}x{r.size} value {r.energy_exact_finite:.4g} (Kaufman)")
    z_flag(r.z_abs_magnetisation_reference, "|magnetisation|", r.abs_magnetisation, r.abs_magnetisation_stderr,
           f"the reference {r.abs_magnetisation_reference:.4g} +- {r.abs_magnetisation_reference_stderr:.2g}")
    z_flag(r.z_specific_heat_reference, "specific heat", r.specific_heat, r.specific_heat_stderr,
           f"the reference {r.specific_heat_reference:.4g} +- {r.specific_heat_reference_stderr:.2g}")
    z_flag(r.z_specific_heat_exact_finite, "specific heat", r.specific_heat, r.specific_heat_stderr,
           f"the exact {r.size}x{r.size} value {r.specific_heat_exact_finite:.4g} (Kaufman)")
    z_flag(r.z_susceptibility_reference, "susceptibility", r.susceptibility, r.susceptibility_stderr,
           f"the reference {r.susceptibility_reference:.4g} +- {r.susceptibility_reference_stderr:.2g}")
    for name, p, w1 in (("energy", r.pvalue_energy, r.w1_energy),
                        ("|magnetisation|", r.pvalue_abs_magnetisation, r.w1_abs_magnetisation)):
        if p < alpha:
            flags.append(f"{at}: {name} distribution differs from the reference (KS p = {p:.2g} < {alpha:g}, "
                         f"W1 = {w1:.3g})")
    if abs(r.z_reference_energy_exact_finite) > z_max:
        flags.append(f"{at}: the REFERENCE data's energy {r.energy_reference:.4g} is "
                     f"{abs(r.z_reference_energy_exact_finite):.1f} sigma from the exact {r.size}x{r.size} value "
                     f"{r.energy_exact_finite:.4g}: the reference shards are not equilibrium samples at this "
                     f"temperature (wrong temperature label or unconverged Monte Carlo)")
    return flags


def _notes(r: IsingReport) -> list[str]:
    notes = [
        f"energy_exact is the infinite-lattice value (Onsager); an {r.size}x{r.size} periodic lattice has "
        f"{r.energy_exact_finite:.5g} exactly (Kaufman), which is what the z-scores use",
    ]
    if r.temperature >= exact.T_CRITICAL:
        notes.append(
            f"T={r.temperature:g} >= T_c={exact.T_CRITICAL:.4f}: the infinite-lattice |m| is 0, but an "
            f"{r.size}x{r.size} lattice has |m| = O(1/L) (reference {r.abs_magnetisation_reference:.3g}); "
            f"|m| is compared with the reference data, not with magnetisation_exact"
        )
    else:
        notes.append(
            f"T={r.temperature:g} < T_c: magnetisation_exact is Yang's infinite-lattice spontaneous "
            f"magnetisation; finite-size corrections make the {r.size}x{r.size} value differ, most near T_c; "
            f"|m| is compared with the reference data"
        )
    return notes


# ----------------------------------------------------------------------------------------
# Entropy bound for likelihood models


@dataclass
class EntropyComparison:
    bits_per_spin: float  # the model's negative ELBO on held-out lattices, bits per spin
    bits_per_spin_stderr: float
    entropy_bits_per_spin: float  # Onsager's S(T) / ln 2, infinite lattice
    entropy_bits_per_spin_finite: float  # exact L x L entropy (Kaufman), the actual bound
    gap_bits_per_spin: float  # bits_per_spin - entropy_bits_per_spin_finite (>= 0 up to noise)
    z_gap: float
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_with_entropy(bits_per_spin: float, stderr: float, temperature: float, size: int,
                         *, z_max: float = DEFAULT_Z_MAX) -> EntropyComparison:
    """The ELBO in bits per spin against the exact entropy per spin, which no model of the
    Boltzmann distribution can beat: E_data[-log2 p_model(x)] = H(data) + KL(data || model)
    >= H(data), and the negative ELBO is >= -log2 p_model(x) (Kingma et al. 2021, eq. 1).
    The finite lattice's entropy per spin differs from Onsager's S(T) by finite-size
    corrections (O(1/L^2) away from T_c; Ferdinand & Fisher, Phys. Rev. 185, 832 (1969)),
    so the gap is taken against the exact L x L value from Kaufman's partition function."""
    t = float(temperature)
    s_inf = float(exact.exact_entropy_per_spin(t)) / math.log(2)
    s_fin = exact_finite_lattice(t, size).entropy_per_spin / math.log(2)
    gap = bits_per_spin - s_fin
    z = gap / stderr if stderr > 0 else (math.copysign(math.inf, gap) if gap else 0.0)
    c = EntropyComparison(
        bits_per_spin=float(bits_per_spin), bits_per_spin_stderr=float(stderr),
        entropy_bits_per_spin=s_inf, entropy_bits_per_spin_finite=s_fin, gap_bits_per_spin=gap, z_gap=z,
    )
    c.notes.append(
        f"T={t:g}: entropy_bits_per_spin = S(T)/ln 2 of the infinite lattice ({s_inf:.5f}); the "
        f"{size}x{size} lattice's exact entropy is {s_fin:.5f} bits/spin (finite-size correction "
        f"{s_fin - s_inf:+.2g}, O(1/L^2)); the gap is taken against the latter"
    )
    if z < -z_max:
        c.flags.append(
            f"T={t:g}: bits per spin {bits_per_spin:.4f} +- {stderr:.2g} is {-z:.1f} sigma BELOW the exact entropy "
            f"{s_fin:.4f} bits/spin, which no model can beat: the likelihood evaluation or the data are wrong"
        )
    return c
