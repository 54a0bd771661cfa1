"""Time-step samplers: stratification across ranks, unbiased importance weights, state."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.objectives.base import StepContext
from pipeline.objectives.vdm.timesteps import ImportanceSampler, StratifiedSampler, UniformSampler, stratified_uniform


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


def test_bad_sampler_arguments_raise():
    with pytest.raises(ValueError, match="num_bins"):
        ImportanceSampler(0)
    with pytest.raises(ValueError, match="uniform_mix"):
        ImportanceSampler(4, uniform_mix=0.0)
    with pytest.raises(ValueError, match="StepContext"):
        stratified_uniform(4, StepContext(0, 2, 2, 0, 1))
