"""`pipeline evaluate --samples DIR`: the shard-by-shard histograms give exactly what the
in-memory evaluation of the same lattices gives (brute force: every lattice at once)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.meta import DataMeta
from pipeline.data.shards import write_shards
from pipeline.data.sources import SourceData
from pipeline.eval.ising import measure
from pipeline.eval.sample_set import evaluate_sample_set, wasserstein1_weighted
from pipeline.physics.observables import wasserstein1


def _lattices(rng, n, L, p_up):
    return np.where(rng.random((n, 1, L, L)) < p_up, 1, -1).astype(np.int8)


def test_streamed_observables_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([_lattices(rng, 130, 6, 0.5), _lattices(rng, 80, 6, 0.8)])  # a broad |m| distribution
    ref = _lattices(rng, 90, 6, 0.6)
    meta = DataMeta(sample_shape=(1, 6, 6), data_kind="spins")
    write_shards(SourceData(x=x, meta=meta), tmp_path / "s", source="test", params={}, samples_per_shard=40,
                 val_fraction=0.0)
    r = evaluate_sample_set(tmp_path / "s", ref.astype(np.float32), 2.5)
    want, want_ref = measure(x, 2.5), measure(ref, 2.5)
    assert r["num_samples"] == 210 and r["max_samples_in_memory"] == 40  # one shard at a time
    for key, est in [("energy_per_spin", want.energy_per_spin), ("abs_magnetisation", want.abs_magnetisation),
                     ("specific_heat", want.specific_heat), ("susceptibility", want.susceptibility)]:
        assert r[key] == pytest.approx(est.value, rel=1e-12, abs=1e-12), key
        assert r[f"{key}_stderr"] == pytest.approx(est.stderr, rel=1e-9), key
    assert r["energy_reference"] == pytest.approx(want_ref.energy_per_spin.value, abs=1e-12)
    assert r["w1_energy"] == pytest.approx(wasserstein1(want.energies, want_ref.energies), abs=1e-12)
    assert r["w1_abs_magnetisation"] == pytest.approx(
        wasserstein1(want.abs_magnetisations, want_ref.abs_magnetisations), abs=1e-12)
    assert math.isfinite(r["energy_err_sigma"]) and r["temperature"] == 2.5


def test_weighted_w1_is_the_w1_of_the_expanded_samples():
    rng = np.random.default_rng(3)
    a, b = rng.integers(-5, 6, 300) / 4, rng.integers(-3, 9, 200) / 4
    va, wa = np.unique(a, return_counts=True)
    vb, wb = np.unique(b, return_counts=True)
    assert wasserstein1_weighted(va, wa.astype(float), vb, wb.astype(float)) == pytest.approx(wasserstein1(a, b), abs=1e-12)


def test_non_ising_sets_are_refused(tmp_path):
    meta = DataMeta(sample_shape=(3,), data_kind="continuous")
    write_shards(SourceData(x=np.zeros((4, 3), np.float32), meta=meta), tmp_path / "c", source="test", params={},
                 val_fraction=0.0)
    with pytest.raises(ValueError, match="handles 2D Ising sample sets"):
        evaluate_sample_set(tmp_path / "c", np.zeros((4, 3), np.float32), 2.0)
