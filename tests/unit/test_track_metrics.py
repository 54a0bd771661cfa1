"""Derived training views: each checked against numpy / a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.track.metrics import (
    RunningMoments,
    ThroughputMeter,
    TimeProfile,
    effective_sample_size,
    physics_metrics,
    rss_bytes,
    sampler_ess_fraction,
    sampler_metrics,
)


def test_running_moments_match_numpy_over_uneven_batches_with_large_offset():
    rng = np.random.default_rng(0)
    # ELBOs in nats sit far from 0: the naive sum-of-squares formula loses all digits here.
    x = 1e8 + rng.normal(size=1001)
    rm = RunningMoments()
    for chunk in np.split(x, [1, 2, 10, 300, 301, 777]):  # includes single values
        rm.update(chunk)
    assert rm.count == x.size
    assert rm.mean == pytest.approx(x.mean(), rel=1e-15)
    # x itself is only stored to ~1e-8 absolute at 1e8, so ~1e-8 relative is the floor.
    assert rm.var == pytest.approx(np.var(x, ddof=1), rel=1e-6)
    assert rm.var_population == pytest.approx(np.var(x), rel=1e-6)
    assert rm.sem == pytest.approx(np.std(x, ddof=1) / math.sqrt(x.size), rel=1e-6)
    naive = (x**2).mean() - x.mean() ** 2  # what the test guards against
    assert abs(naive - np.var(x)) > 1e-3 * np.var(x)


def test_running_moments_merge_equals_one_stream_and_skips_nan():
    rng = np.random.default_rng(1)
    a, b = rng.normal(3, 2, size=50), rng.normal(-1, 0.5, size=70)
    left, right = RunningMoments(), RunningMoments()
    left.update(a)
    right.update(np.concatenate([b, [np.nan, np.inf]]))
    left.merge(right)
    both = np.concatenate([a, b])
    assert left.count == 120
    assert left.mean == pytest.approx(both.mean(), rel=1e-12)
    assert left.var == pytest.approx(np.var(both, ddof=1), rel=1e-12)
    m = left.metrics("vdm/elbo")
    assert m["vdm/elbo/std"] == pytest.approx(np.std(both, ddof=1), rel=1e-12)


def test_running_moments_undefined_variance_is_nan():
    rm = RunningMoments()
    rm.update(5.0)
    assert rm.mean == 5.0 and math.isnan(rm.var) and math.isnan(rm.sem)


def test_time_profile_matches_brute_force_binning():
    rng = np.random.default_rng(2)
    prof = TimeProfile(num_bins=7, t_min=0.0, t_max=1.0)
    ts, losses = [], []
    for _ in range(5):
        t = rng.uniform(0, 1, size=40)
        t[:2] = [0.0, 1.0]  # both ends: t_max belongs to the last bin
        loss = rng.exponential(1 + 10 * t)
        prof.update(t, loss)
        ts.append(t)
        losses.append(loss)
    t, loss = np.concatenate(ts), np.concatenate(losses)
    edges = np.linspace(0, 1, 8)
    for k in range(7):
        lo, hi = edges[k], edges[k + 1]
        sel = (t >= lo) & ((t < hi) if k < 6 else (t <= hi))
        assert prof.count[k] == sel.sum()
        assert prof.mean[k] == pytest.approx(loss[sel].mean(), rel=1e-12)
        assert prof.std[k] == pytest.approx(loss[sel].std(ddof=1), rel=1e-9)
    d = prof.as_dict()
    assert d["t"] == pytest.approx(list((edges[:-1] + edges[1:]) / 2))
    assert sum(d["count"]) == t.size


def test_time_profile_empty_bins_nan_and_bad_t_rejected():
    prof = TimeProfile(num_bins=4)
    prof.update([0.1, 0.15], [1.0, 3.0])
    assert prof.mean[0] == 2.0 and np.isnan(prof.mean[1:]).all()
    assert prof.as_dict()["mean"][1:] == [None, None, None]
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        prof.update([1.5], [1.0])
    with pytest.raises(ValueError, match="same number"):
        prof.update([0.1, 0.2], [1.0])


def test_effective_sample_size_kish_formula():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    assert effective_sample_size(w) == pytest.approx(100 / 30)
    assert effective_sample_size(np.ones(17)) == pytest.approx(17)
    with pytest.raises(ValueError):
        effective_sample_size([1.0, -1.0])


def test_sampler_ess_fraction_equals_ess_of_exact_sample_population():
    # p = (1/2, 1/4, 1/8, 1/8) over K=4 bins: a population of 8 draws realises it exactly.
    p = np.array([0.5, 0.25, 0.125, 0.125])
    draws = [0, 0, 0, 0, 1, 1, 2, 3]
    weights = np.array([1.0 / (4 * p[k]) for k in draws])  # uniform/p importance weights
    assert weights.mean() == pytest.approx(1.0)  # unbiased
    assert sampler_ess_fraction(p) == pytest.approx(effective_sample_size(weights) / len(draws))
    assert sampler_ess_fraction(np.full(9, 1 / 9)) == pytest.approx(1.0)
    m = sampler_metrics(p)
    assert m["vdm/p_t/max_over_min"] == pytest.approx(4.0)
    assert m["vdm/p_t/entropy_norm"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    with pytest.raises(ValueError, match="biased"):
        sampler_ess_fraction([0.5, 0.5, 0.0])


def test_physics_metrics_on_lattices_with_known_observables():
    up = np.ones((3, 4, 4))  # all up: E/N = -2 (2 bonds per site), |m| = 1
    checker = np.indices((4, 4)).sum(0) % 2 * 2.0 - 1  # checkerboard: E/N = +2, m = 0
    gen = np.stack([up[0], checker, -up[0]])[:, None]  # [N, 1, L, L]; -up: E/N = -2, |m| = 1
    ref = up
    m = physics_metrics(gen, ref)
    assert m["phys/energy_per_spin"] == pytest.approx((-2 + 2 - 2) / 3)
    assert m["phys/abs_magnetisation"] == pytest.approx(2 / 3)
    assert m["phys/energy_per_spin_ref"] == pytest.approx(-2)
    assert m["phys/abs_magnetisation_ref"] == pytest.approx(1)
    # W1 between {-2, 2, -2} and {-2, -2, -2}: one third of the mass moves by 4.
    assert m["phys/energy_per_spin_w1"] == pytest.approx(4 / 3)
    assert m["phys/nonfinite_lattices"] == 0


def test_physics_metrics_maps_continuous_to_spins_and_counts_nonfinite():
    x = np.full((3, 4, 4), 0.3)  # sign -> all up
    x[1] = np.nan
    m = physics_metrics(x)
    assert m["phys/nonfinite_lattices"] == 1
    assert m["phys/energy_per_spin"] == pytest.approx(-2) and m["phys/abs_magnetisation"] == pytest.approx(1)
    with pytest.raises(ValueError, match=r"\[N, L, L\]"):
        physics_metrics(np.ones((2, 2, 4, 4)))


def test_throughput_meter_window_averages():
    meter = ThroughputMeter()
    meter.update(num_samples=32, step_s=0.5, data_wait_s=0.1)
    meter.update(num_samples=32, step_s=1.5, data_wait_s=0.3)
    m = meter.metrics()
    assert m["perf/samples_per_s"] == pytest.approx(64 / 2.0)
    assert m["perf/step_time_s"] == pytest.approx(1.0)
    assert m["perf/data_wait_s"] == pytest.approx(0.2)
    assert m["perf/data_wait_fraction"] == pytest.approx(0.2)
    assert meter.metrics() == {}  # window restarted


def test_rss_grows_with_a_large_allocation():
    import mmap

    # A fresh anonymous mapping, every page written: new resident pages whatever the allocator
    # kept from earlier tests in this process (a malloc'd block may reuse freed, resident memory,
    # which made this test depend on the tests run before it in the same pytest worker).
    size, page = 64 * 2**20, mmap.PAGESIZE
    block = mmap.mmap(-1, size)
    before = rss_bytes()
    for offset in range(0, size, page):
        block[offset] = 1
    after = rss_bytes()
    block.close()
    assert after - before > 48 * 2**20
