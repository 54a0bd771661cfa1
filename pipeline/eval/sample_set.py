"""``pipeline evaluate --samples DIR --data REF``: a sample set on disk, judged shard by shard.

For sets too large to hold (``pipeline sample --out DIR`` with a million lattices), the shards
are read one at a time and reduced to exact histograms: on an L x L periodic lattice the
energy per spin and |m| take values k / L^2 with k an integer, so the counts per k are the
whole empirical distribution in O(L^2) memory, whatever the number of samples. Means,
variances (specific heat, susceptibility), their standard errors and W1 against the
reference data come from the histograms, with the same estimators as ``pipeline evaluate``
(:mod:`pipeline.eval.ising`); memory is bounded by one shard plus the reference set.
2D Ising sample sets only, so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.eval.ising import Estimate, exact_finite_lattice, z_score


@dataclass
class LatticeHistogram:
    """Exact counts of an observable whose values are integers / ``num_sites``."""

    num_sites: int
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, values: np.ndarray) -> None:
        k = np.rint(np.asarray(values, dtype=np.float64) * self.num_sites)
        assert np.allclose(k / self.num_sites, values, atol=1e-9), "values are not multiples of 1/num_sites"
        for v, c in zip(*np.unique(k.astype(np.int64), return_counts=True)):
            self.counts[int(v)] = self.counts.get(int(v), 0) + int(c)

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        ks = sorted(self.counts)
        return np.array(ks, dtype=np.float64) / self.num_sites, np.array([self.counts[k] for k in ks], dtype=np.float64)

    @property
    def num_values(self) -> int:
        return sum(self.counts.values())

    def mean(self) -> Estimate:
        """As :func:`pipeline.eval.ising.mean_estimate` on the samples: stderr from the ddof=1 std."""
        v, w = self.support()
        n = w.sum()
        m = float((v * w).sum() / n)
        var1 = float((w * (v - m) ** 2).sum() / (n - 1)) if n > 1 else math.inf
        return Estimate(m, math.sqrt(var1 / n))

    def variance(self) -> Estimate:
        """As :func:`pipeline.eval.ising.variance_estimate`: 1/n variance, delta-method stderr."""
        v, w = self.support()
        n = w.sum()
        c = v - (v * w).sum() / n
        var, mu4 = float((w * c**2).sum() / n), float((w * c**4).sum() / n)
        return Estimate(var, math.sqrt(max(mu4 - var**2, 0.0) / n))


def wasserstein1_weighted(va: np.ndarray, wa: np.ndarray, vb: np.ndarray, wb: np.ndarray) -> float:
    """W1 = int |F_a - F_b| dx between two weighted empirical distributions (sorted supports
    ``va``, ``vb``), exactly on the merged support, as :func:`pipeline.physics.observables.wasserstein1`."""
    support = np.union1d(va, vb)

    def cdf(v: np.ndarray, w: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(w)]) / w.sum()
        return cum[np.searchsorted(v, support, side="right")]

    return float(np.sum(np.abs(cdf(va, wa) - cdf(vb, wb))[:-1] * np.diff(support)))


def _histograms(shard_arrays, num_sites: int) -> tuple[LatticeHistogram, LatticeHistogram, int]:
    from pipeline.physics.observables import abs_magnetisation, energy_per_spin, to_spins

    e, m = LatticeHistogram(num_sites), LatticeHistogram(num_sites)
    largest = 0
    for x in shard_arrays:
        s = to_spins(x)
        e.add(energy_per_spin(s))
        m.add(abs_magnetisation(s))
        largest = max(largest, len(x))
    return e, m, largest


def _iter_shards(samples_dir: Path, manifest: dict[str, Any], sample_shape: tuple[int, ...]):
    from pipeline.eval.reference import _read_shard

    for s in manifest["shards"]:
        yield _read_shard(str(samples_dir / s["name"]), sample_shape)[0]


def evaluate_sample_set(samples_dir: str | Path, reference_x: np.ndarray, temperature: float) -> dict[str, Any]:
    """Energy, |m|, specific heat and susceptibility of the sample set at ``samples_dir`` (read
    shard by shard) against the exact finite lattice and the reference lattices ``reference_x``."""
    from pipeline.data.shards import meta_from_dict, read_manifest

    samples_dir = Path(samples_dir)
    manifest = read_manifest(samples_dir)
    meta = meta_from_dict(manifest["meta"])
    shape = tuple(meta.sample_shape)
    if meta.data_kind != "spins" or not (len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2]):
        raise ValueError(f"evaluate --samples handles 2D Ising sample sets (spins [1, L, L]) so far; "
                         f"{samples_dir} holds {meta.data_kind} samples of shape {shape}")
    if tuple(reference_x.shape[1:]) != shape:
        raise ValueError(f"the samples have shape {shape} but the reference data {tuple(reference_x.shape[1:])}")
    L, n_sites, t = shape[1], shape[1] * shape[2], float(temperature)
    e, m, largest = _histograms(_iter_shards(samples_dir, manifest, shape), n_sites)
    ref_e, ref_m, _ = _histograms([reference_x], n_sites)
    fin = exact_finite_lattice(t, L)
    energy, c_var, m_var = e.mean(), e.variance(), m.variance()
    heat = Estimate(n_sites * c_var.value / t**2, n_sites * c_var.stderr / t**2)
    return {
        "evaluation": "ising-sample-set", "samples": str(samples_dir), "temperature": t, "size": L,
        "num_samples": e.num_values, "max_samples_in_memory": largest,
        "energy_per_spin": energy.value, "energy_per_spin_stderr": energy.stderr,
        "energy_exact_finite": fin.energy_per_spin,
        "energy_rel_err": (energy.value - fin.energy_per_spin) / abs(fin.energy_per_spin),
        "energy_err_sigma": z_score(energy, fin.energy_per_spin),
        "energy_reference": ref_e.mean().value, "energy_reference_stderr": ref_e.mean().stderr,
        "abs_magnetisation": m.mean().value, "abs_magnetisation_stderr": m.mean().stderr,
        "abs_magnetisation_reference": ref_m.mean().value,
        "specific_heat": heat.value, "specific_heat_stderr": heat.stderr,
        "specific_heat_exact_finite": fin.specific_heat,
        "susceptibility": n_sites * m_var.value / t, "susceptibility_stderr": n_sites * m_var.stderr / t,
        "w1_energy": wasserstein1_weighted(*e.support(), *ref_e.support()),
        "w1_abs_magnetisation": wasserstein1_weighted(*m.support(), *ref_m.support()),
    }
