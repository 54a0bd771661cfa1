"""Time-step samplers: stratification across ranks, unbiased importance weights, state."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.objectives.base import StepContext
from pipeline.objectives.vdm.timesteps import (ControlVariateImportanceSampler, ImportanceSampler, StratifiedSampler,
                                              UniformSampler, stratified_uniform)


def test_stratified_one_point_per_stratum_across_ranks_and_accumulation():
    B, world, accum = 8, 2, 2
    N = B * world * accum
    for step in range(5):
        us = torch.cat([
            stratified_uniform(B, StepContext(step, micro, accum, rank, world))
            for rank in range(world) for micro in range(accum)
        ])
        strata = torch.floor(us * N).long()
        assert sorted(strata.tolist()) == list(range(N)), step


def test_stratified_u_is_marginally_uniform_for_every_sample():
    # Each sample position's u must be U[0,1) over steps (the stratum assignment is random).
    B = 4
    us = torch.stack([stratified_uniform(B, StepContext(s, 0, 1, 0, 2)) for s in range(4000)])
    for i in range(B):
        assert abs(float(us[:, i].mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 4000)
    assert abs(float((us < 0.25).float().mean()) - 0.25) < 0.03


def test_stratified_reduces_variance_of_a_smooth_integral():
    f = lambda u: torch.sin(3 * u) + u**2  # noqa: E731
    exact = (1 - math.cos(3)) / 3 + 1 / 3
    ctx = StepContext(0, 0, 1, 0, 1)
    strat = torch.stack([f(StratifiedSampler()(64, StepContext(s, 0, 1, 0, 1))[0]).mean() for s in range(300)])
    unif = torch.stack([f(UniformSampler()(64, ctx)[0]).mean() for _ in range(300)])
    assert abs(float(strat.mean()) - exact) < 4 * float(strat.std()) / math.sqrt(300)
    assert float(strat.std()) < 0.2 * float(unif.std())


def _filled_sampler(K=6, H=5, mix=0.1):
    s = ImportanceSampler(K, history=H, uniform_mix=mix)
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 5.0, 0.5, 2.0, 0.05])[:K]
    for _ in range(4):
        u = torch.rand(200, generator=g)
        k = (u * K).long()
        s.update(u, scale[k] * (1 + 0.1 * torch.randn(200, generator=g)), lambda t: t)
    return s, scale


def test_importance_probs_follow_root_mean_square_loss():
    s, scale = _filled_sampler()
    p = s.probs()
    rms = s.loss_sq.mean(1).sqrt()
    ref = 0.9 * rms / rms.sum() + 0.1 / 6
    torch.testing.assert_close(p, ref)
    assert int(p.argmax()) == 2


def test_importance_weights_leave_the_mean_unchanged():
    s, scale = _filled_sampler()
    K = 6
    L = scale.double() * 3 + 1  # any per-bin loss
    # Brute force over bins: sum_k p_k * w_k * L_k = mean_k L_k.
    p = s.probs()
    assert abs(float((p * (1 / (K * p)) * L).sum()) - float(L.mean())) < 1e-12
    # And the sampler's actual draws (density K p_k on bin k, weight 1 / (K p_k)).
    vals = []
    for step in range(200):
        u, w = s(256, StepContext(step, 0, 1, 0, 1))
        k = (u * K).long()
        vals.append(w.double() * L[k])
    v = torch.cat(vals)
    assert abs(float(v.mean()) - float(L.mean())) < 4 * float(v.std()) / math.sqrt(len(v))
    # The bins are drawn with probabilities p.
    counts = torch.bincount(torch.cat([(s(256, StepContext(i, 0, 1, 0, 1))[0] * K).long() for i in range(100)]), minlength=K)
    freq = counts.double() / counts.sum()
    assert float((freq - p).abs().max()) < 0.01


def test_importance_is_uniform_until_every_bin_has_history():
    s = ImportanceSampler(4, history=3)
    s.update(torch.tensor([0.1, 0.3, 0.6, 0.1, 0.3, 0.6, 0.1, 0.3, 0.6]), torch.arange(1.0, 10.0), lambda t: t)
    torch.testing.assert_close(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))
    s.update(torch.tensor([0.9, 0.9, 0.9]), torch.ones(3), lambda t: t)
    assert not torch.allclose(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))


def test_importance_ring_buffer_matches_a_naive_reference():
    K, H = 3, 4
    s = ImportanceSampler(K, history=H)
    hist = {k: [] for k in range(K)}
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        n = int(torch.randint(1, 15, (1,), generator=g))
        u = torch.rand(n, generator=g)
        loss = torch.randn(n, generator=g)
        s.update(u, loss, lambda t: t)
        for ui, li in zip(u.tolist(), loss.tolist()):
            hist[min(int(ui * K), K - 1)].append(li * li)
    for k in range(K):
        last = sorted(hist[k][-H:])
        got = sorted(s.loss_sq[k, : min(H, len(hist[k]))].tolist()) if len(hist[k]) < H else sorted(s.loss_sq[k].tolist())
        assert got == pytest.approx(last), k
        assert int(s.count[k]) == len(hist[k])


def test_importance_state_is_identical_across_ranks_and_round_trips():
    full_u, full_loss = torch.rand(64), torch.rand(64)  # what all_gather returns on every rank
    ranks = []
    for r in range(2):
        s = ImportanceSampler(5, history=4)
        answers = iter([full_u, full_loss])  # fake all_gather: update gathers u, then the losses
        s.update(full_u[r * 32:(r + 1) * 32], full_loss[r * 32:(r + 1) * 32], lambda t, a=answers: next(a).to(t.dtype))
        ranks.append(s)
    torch.testing.assert_close(ranks[0].loss_sq, ranks[1].loss_sq)
    assert int(ranks[0].count.sum()) == 64
    fresh = ImportanceSampler(5, history=4)
    fresh.load_state_dict(ranks[0].state_dict())
    torch.testing.assert_close(fresh.probs(), ranks[0].probs())
    assert torch.equal(fresh.count, ranks[0].count)


def _cv_filled(K=12, H=8):
    """A control-variate sampler whose bins' losses have means far apart and small spreads (the
    case it is for), with its history written by the sampler's own update."""
    s = ControlVariateImportanceSampler(K, history=H, uniform_mix=0.1)
    g = torch.Generator().manual_seed(0)
    mean = 10.0 + 5.0 * torch.sin(torch.arange(K, dtype=torch.float64))
    for _ in range(6):
        u = torch.rand(400, generator=g)
        k = (u * K).long()
        s.update(u, mean[k] + 0.3 * torch.randn(400, generator=g, dtype=torch.float64), lambda t: t)
    return s, mean


def test_control_variate_sampler_is_unbiased_with_a_smoothed_baseline_and_beats_importance():
    K = 12
    s, mean = _cv_filled(K)
    # The baseline: each bin's history mean averaged with 2 neighbours on either side (edges
    # repeated), by hand; its integral over [0, 1) is their mean (each bin is 1/K wide).
    m = s.loss.mean(1)
    padded = torch.cat([m[:1], m[:1], m, m[-1:], m[-1:]])
    ref = torch.stack([padded[k:k + 5].mean() for k in range(K)])
    torch.testing.assert_close(s.bin_baselines(), ref)
    u = (torch.arange(K, dtype=torch.float32) + 0.5) / K
    c, integral = s.baseline(u)
    torch.testing.assert_close(c.double(), ref.to(c.dtype).double())
    assert float(integral) == pytest.approx(float(ref.mean()), rel=1e-6)
    # Unbiased for any fixed baseline: by brute force over bins, and over the sampler's draws of
    # a loss it has never seen (L = 2 x the history's means + 1: the baseline is then far off).
    L = 2 * mean + 1
    p = s.probs()
    assert abs(float(integral) + float((p / (K * p) * (L - ref)).sum()) - float(L.mean())) < 1e-5
    est = {"importance-cv": [], "importance": []}
    plain = ImportanceSampler(K, history=8, uniform_mix=0.1)
    plain.load_state_dict({k: v for k, v in s.state_dict().items() if k != "loss"})
    for step in range(300):
        ctx = StepContext(step, 0, 1, 0, 1)
        u, w = s(64, ctx)
        c, integral = s.baseline(u)
        k = (u * K).long()
        est["importance-cv"].append(float((integral + w.double() * (L[k] - c.double())).mean()))
        u, w = plain(64, ctx)
        est["importance"].append(float((w.double() * L[(u * K).long()]).mean()))
    cv = torch.tensor(est["importance-cv"], dtype=torch.float64)
    assert abs(float(cv.mean()) - float(L.mean())) < 4 * float(cv.std()) / math.sqrt(len(cv))
    # More bins than samples per batch (so stratifying the bins cannot remove their means'
    # spread), means rising smoothly over t, noise within each bin: the baseline removes the
    # spread that importance sampling keeps (2.3x lower variance at these settings)
    K, B = 100, 16
    x = torch.arange(K, dtype=torch.float64) / K
    mean = torch.exp(4 * x)
    g = torch.Generator().manual_seed(1)

    def draw(u):
        return mean[(u * K).long().clamp(max=K - 1)] + torch.randn(len(u), generator=g, dtype=torch.float64)

    s = ControlVariateImportanceSampler(K, history=8, uniform_mix=0.1)
    for _ in range(20):
        u = torch.rand(400, generator=g)
        s.update(u, draw(u), lambda t: t)
    plain = ImportanceSampler(K, history=8, uniform_mix=0.1)
    plain.load_state_dict({k: v for k, v in s.state_dict().items() if k != "loss"})
    est = {"cv": [], "importance": []}
    for step in range(400):
        ctx = StepContext(step, 0, 1, 0, 1)
        u, w = s(B, ctx)
        c, integral = s.baseline(u)
        est["cv"].append(float((integral + w.double() * (draw(u) - c.double())).mean()))
        u, w = plain(B, ctx)
        est["importance"].append(float((w.double() * draw(u)).mean()))
    cv, imp = (torch.tensor(est[k], dtype=torch.float64) for k in ("cv", "importance"))
    assert abs(float(cv.mean()) - float(mean.mean())) < 4 * float(cv.std()) / math.sqrt(len(cv))
    assert cv.var() < imp.var() / 1.5


def test_control_variate_sampler_is_plain_uniform_until_full_and_round_trips():
    s = ControlVariateImportanceSampler(4, history=3)
    s.update(torch.tensor([0.1, 0.3, 0.6]), torch.tensor([1.0, 2.0, 3.0]), lambda t: t)
    c, integral = s.baseline(torch.tensor([0.1, 0.9]))
    assert torch.equal(c, torch.zeros(2)) and float(integral) == 0.0
    torch.testing.assert_close(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))
    full, mean = _cv_filled()
    fresh = ControlVariateImportanceSampler(12, history=8)
    fresh.load_state_dict(full.state_dict())
    torch.testing.assert_close(fresh.probs(), full.probs())
    torch.testing.assert_close(fresh.bin_baselines(), full.bin_baselines())
    # the history holds the losses themselves beside their squares
    torch.testing.assert_close(full.loss**2, full.loss_sq)


def test_bad_sampler_arguments_raise():
    with pytest.raises(ValueError, match="num_bins"):
        ImportanceSampler(0)
    with pytest.raises(ValueError, match="uniform_mix"):
        ImportanceSampler(4, uniform_mix=0.0)
    with pytest.raises(ValueError, match="StepContext"):
        stratified_uniform(4, StepContext(0, 2, 2, 0, 1))
