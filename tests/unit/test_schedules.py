"""Noise schedules: endpoints, monotonicity, analytic derivatives (vs finite differences)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.objectives.vdm.schedules import CosineSchedule, LearnedSchedule, LinearSchedule, build_schedule

G0, G1 = -13.3, 5.0


def _fd(sched, t, h=1e-6):
    t = t.double()
    return (sched(t + h)[0] - sched(t - h)[0]) / (2 * h)


@pytest.mark.parametrize("name", ["linear", "cosine", "learned"])
def test_endpoints_monotone_and_derivative(name):
    torch.manual_seed(0)
    s = build_schedule(name, G0, G1).double()
    ends, _ = s(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([G0, G1], dtype=torch.float64), rtol=0, atol=1e-5)
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    g, dg = s(t)
    assert bool((g[1:] > g[:-1]).all()) and bool((dg > 0).all())
    torch.testing.assert_close(dg, _fd(s, t), rtol=1e-6, atol=1e-6)


def test_cosine_matches_its_definition():
    s = CosineSchedule(G0, G1).double()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    g, _ = s(t)
    # alpha^2 = cos^2(pi u / 2) on the u interval with the right endpoints.
    u0 = 2 / math.pi * math.atan(math.exp(G0 / 2))
    u1 = 2 / math.pi * math.atan(math.exp(G1 / 2))
    u = u0 + (u1 - u0) * t
    torch.testing.assert_close(torch.sigmoid(-g), torch.cos(math.pi * u / 2) ** 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(LinearSchedule(G0, G1)(t)[0], G0 + (G1 - G0) * t)


def test_learned_schedule_stays_monotone_after_adversarial_updates():
    torch.manual_seed(1)
    s = LearnedSchedule(G0, G1, learn_endpoints=True)
    opt = torch.optim.SGD(s.parameters(), lr=5.0)
    t = torch.rand(256)
    for _ in range(20):  # push gamma(t) towards a decreasing function and the endpoints to cross
        g, _ = s(t)
        loss = (g * (t - 0.5)).sum() + 10 * (s.endpoints()[1] - s.endpoints()[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tt = torch.linspace(0, 1, 1001)
    g, dg = s(tt)
    assert bool((g[1:] >= g[:-1]).all()) and bool((dg > 0).all())
    g0, g1 = (g.detach() for g in s.endpoints())
    assert float(g1) > float(g0)
    assert abs(float(g0) - G0) > 1e-3  # the endpoints did move (they are learned)


def test_fixed_endpoints_are_not_parameters():
    s = LearnedSchedule(G0, G1, learn_endpoints=False)
    names = {n for n, _ in s.named_parameters()}
    assert "gamma_0" not in names and "gap_raw" not in names
    assert "gamma_0" in s.state_dict()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        LinearSchedule(1.0, -1.0)
    with pytest.raises(ValueError, match="allowed"):
        build_schedule("quadratic", G0, G1)
    with pytest.raises(ValueError, match="learned"):
        build_schedule("linear", G0, G1, learn_endpoints=True)
