"""Per-sample draws keyed by the global position: a VDM's training estimate of a global batch
does not depend on how that batch is split over ranks and micro steps (elastic resume)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import StepContext
from pipeline.objectives.draws import SampleDraws, sample_key
from pipeline.objectives.vdm import VDM, VDMConfig

META = DataMeta(sample_shape=(1, 8, 8), data_kind="spins")
G = 12  # global batch
SEED = 7


def _global_batch(step):
    g = torch.Generator().manual_seed(step)
    x = (torch.rand((G, 1, 8, 8), generator=g) < 0.5).float() * 2 - 1
    return x, torch.arange(step * G, (step + 1) * G)  # the positions of the elastic order


def _run(m: VDM, world_size: int, accum: int, num_steps: int):
    """Per-sample (u, weight, diffusion loss, recon-included bpd) of every global batch, computed
    as ``world_size`` ranks x ``accum`` micro steps would (rank r's micro batch m holds
    positions (m * world_size + r) * B + [0, B)), with the sampler hooks run as the loop does."""
    B = G // (world_size * accum)
    rows = []
    for step in range(num_steps):
        x, index = _global_batch(step)
        parts = {}
        for micro in range(accum):
            outs = []
            for rank in range(world_size):
                sl = slice((micro * world_size + rank) * B, (micro * world_size + rank + 1) * B)
                ctx = StepContext(step, micro, accum, rank, world_size, SEED)
                with torch.no_grad():
                    outs.append((sl, m({"x": x[sl], "index": index[sl]}, ctx)))
            # every rank's hook sees the all-gathered values, in rank order
            gathered_u = torch.cat([o.u for _, o in outs])
            gathered_l = torch.cat([o.diff_per_sample for _, o in outs])
            gathered = iter([gathered_u, gathered_l])  # what all_gather returns to every rank
            m.after_micro_step(outs[0][1], lambda t: next(gathered))
            for sl, o in outs:
                parts[sl.start] = torch.stack([o.u, o.weight, o.diff_per_sample])
        m.after_optimizer_step(lambda t: t)
        rows.append(torch.cat([parts[k] for k in sorted(parts)], dim=1))
    return torch.stack(rows)


@pytest.mark.parametrize("sampler", ["uniform", "stratified", "importance"])
def test_the_global_batch_estimate_does_not_depend_on_the_split(sampler):
    cfg = VDMConfig(channels=8, num_timesteps=6, timestep_sampler=sampler, importance_history=1)
    torch.manual_seed(0)
    base = VDM(cfg, META).eval()
    state = base.state_dict()
    results = {}
    for world_size, accum in [(1, 1), (2, 1), (1, 2), (3, 2)]:
        m = VDM(cfg, META).eval()
        m.load_state_dict(state)
        # enough steps that the importance sampler's history fills and its proposal is used
        results[(world_size, accum)] = _run(m, world_size, accum, num_steps=4)
        if sampler == "importance":
            assert m.sampler.ready()
    ref = results[(1, 1)]
    for key, r in results.items():
        torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-6, msg=f"split {key} differs from 1 x 1")


def test_sample_draws_are_keyed_by_position_not_by_batch():
    pos = torch.tensor([5, 9, 2])
    a = SampleDraws(1, 0, pos).normal((3, 4), "cpu")
    b = SampleDraws(1, 0, pos[[2, 0, 1]]).normal((3, 4), "cpu")
    torch.testing.assert_close(a[[2, 0, 1]], b, rtol=0, atol=0)
    # another seed, another purpose, another position: other draws
    assert not torch.equal(a, SampleDraws(2, 0, pos).normal((3, 4), "cpu"))
    assert not torch.equal(a, SampleDraws(1, 1, pos).normal((3, 4), "cpu"))
    assert len({sample_key(0, 0, p) for p in range(10_000)}) == 10_000
    # successive calls continue each sample's stream (the k-th draw is the k-th call's)
    d = SampleDraws(1, 0, pos)
    first, second = d.normal((3, 4), "cpu"), d.normal((3, 4), "cpu")
    assert torch.equal(first, a) and not torch.equal(second, a)


def test_draws_are_standard_normal_and_uniform():
    d = SampleDraws(3, 0, torch.arange(4000))
    z = d.normal((4000, 8), "cpu").double()
    assert abs(float(z.mean())) < 4 / (32_000 ** 0.5) and abs(float(z.var()) - 1) < 0.05
    u = d.uniform(4000, "cpu", torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / 4000) ** 0.5


def test_without_positions_or_with_generators_the_draws_are_the_batch_generators():
    m = VDM(VDMConfig(channels=8, num_timesteps=6), META).eval()
    x, index = _global_batch(0)
    ctx = StepContext(0, 0, 1, 0, 1, SEED)
    with torch.no_grad():
        a = m({"x": x, "index": index}, ctx, noise_generator=torch.Generator().manual_seed(1),
              time_generator=torch.Generator().manual_seed(2))
        b = m({"x": x}, ctx, noise_generator=torch.Generator().manual_seed(1), time_generator=torch.Generator().manual_seed(2))
        c = m({"x": x, "index": index}, ctx)
    assert torch.equal(a.diff_per_sample, b.diff_per_sample)  # explicit generators win
    assert not torch.equal(a.u, c.u)
