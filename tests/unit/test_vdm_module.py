"""The VDM module's contract with the training loop: phases, outputs, sampling, state, errors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, build
from pipeline.data.meta import DataMeta
from pipeline.models import UNet
from pipeline.objectives.base import StepContext
from pipeline.objectives.vdm import VDM, VDMConfig, VDMOutput, build_phases, terms
from pipeline.train.phases import Phase

CTX = StepContext(step=0, micro_step=0, grad_accum_steps=1, rank=0, world_size=1)
ISING = DataMeta(sample_shape=(1, 8, 8), data_kind="spins", label_kind="continuous", label_values=(1.5, 2.27, 3.0))


def spins(n, shape=(1, 8, 8)):
    return (torch.rand((n,) + shape) < 0.5).float() * 2 - 1


def test_build_phases_and_one_training_step():
    (ph,) = build_phases(VDMConfig(channels=8, num_timesteps=10), ISING, lr=1e-3, betas=(0.9, 0.99))
    assert isinstance(ph, Phase) and ph.name == "vdm" and ph.ema and ph.lr == 1e-3 and ph.betas == (0.9, 0.99)
    m = ph.module
    assert isinstance(m.denoiser.net, UNet)
    out = m({"x": spins(16), "label": torch.full((16,), 2.27)}, CTX)
    assert isinstance(out, VDMOutput) and out.loss.dim() == 0 and out.loss.requires_grad
    metrics = out.metrics()
    assert {"recon_bpd", "prior_bpd", "diffusion_bpd", "bits_per_dim"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())
    assert abs(metrics["recon_bpd"] + metrics["prior_bpd"] + metrics["diffusion_bpd"] - metrics["bits_per_dim"]) < 1e-4
    assert out.t.shape == out.u.shape == out.diff_per_sample.shape == (16,)
    out.loss.backward()
    assert all(p.grad is not None for p in m.denoiser.parameters())


def test_unet_is_periodic():
    # Circular padding: rolling the lattice rolls the prediction.
    torch.manual_seed(0)
    net = UNet(1, 8, 16)
    with torch.no_grad():
        net.out.weight.normal_()
    z, emb = torch.randn(2, 1, 8, 8), torch.randn(2, 16)
    torch.testing.assert_close(net(torch.roll(z, (2, 4), (2, 3)), emb), torch.roll(net(z, emb), (2, 4), (2, 3)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [10, 0])
def test_sample_values_and_step_bounds(T):
    meta = DataMeta(sample_shape=(1, 4, 4), data_kind="levels", num_levels=4, label_kind="class", num_classes=3)
    m = VDM(VDMConfig(num_timesteps=T, channels=8), meta)
    g = torch.Generator().manual_seed(0)
    s = m.sample(5, labels=torch.tensor([0, 1, 2, 0, 1]), num_steps=3, generator=g)
    assert s.shape == (5, 1, 4, 4) and set(s.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    s2 = m.sample(5, labels=torch.tensor([0, 1, 2, 0, 1]), num_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)  # the generator drives all randomness
    if T:
        m.sample(2, labels=torch.tensor([0, 1]), num_steps=T - 1)
        with pytest.raises(ValueError, match="num_steps must be in 1..9"):
            m.sample(2, labels=torch.tensor([0, 1]), num_steps=T)
    with pytest.raises(ValueError, match="pass labels"):
        m.sample(2)
    sp = VDM(VDMConfig(num_timesteps=T, channels=8), DataMeta(sample_shape=(1, 4, 4), data_kind="spins"))
    assert set(sp.sample(3, num_steps=2).unique().tolist()) <= {-1.0, 1.0}


def test_bad_inputs_raise_clear_errors():
    m = VDM(VDMConfig(channels=8, num_timesteps=10), ISING)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        m({"x": torch.zeros(2, 1, 8, 8), "label": torch.ones(2)}, CTX)
    with pytest.raises(ValueError, match="pass labels"):
        m({"x": spins(2)}, CTX)
    with pytest.raises(ValueError, match="sample shape"):
        m({"x": spins(2, (1, 4, 4)), "label": torch.ones(2)}, CTX)
    u = VDM(VDMConfig(channels=8, num_timesteps=10), DataMeta(sample_shape=(1, 8, 8), data_kind="spins"))
    with pytest.raises(ValueError, match="unconditional"):
        u({"x": spins(2), "label": torch.ones(2)}, CTX)
    c = VDM(VDMConfig(channels=8), DataMeta(sample_shape=(3,), data_kind="levels", num_levels=4, label_kind="class", num_classes=2))
    with pytest.raises(ValueError, match="0..3"):
        c({"x": torch.full((2, 3), 4.0), "label": torch.tensor([0, 1])}, CTX)
    with pytest.raises(ValueError, match="0..1"):
        c({"x": torch.ones(2, 3), "label": torch.tensor([0, 2])}, CTX)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_timesteps=1), "num_timesteps"),
        (dict(num_timesteps=0, diffusion_form="consistency"), "consistency"),
        (dict(num_timesteps=10, timestep_sampler="learned-schedule"), "learned-schedule"),
        (dict(learn_endpoints=True), "learn_endpoints"),
        (dict(gamma_min=3.0, gamma_max=1.0), "gamma_min"),
        (dict(importance_uniform_mix=0.0), "importance_uniform_mix"),
        (dict(channels=0), "channels"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        VDMConfig(**kw).validate()


def test_config_literals_and_data_kind_mismatch():
    with pytest.raises(ConfigError, match="allowed"):
        build(VDMConfig, {"timestep_sampler": "sobol"})
    cfg = build(VDMConfig, {"num_timesteps": 0, "schedule": "learned", "timestep_sampler": "learned-schedule"})
    cfg.validate()
    with pytest.raises(ConfigError, match="manifest"):
        VDM(VDMConfig(data_kind="continuous"), ISING)


def test_importance_history_updates_and_round_trips_through_state_dict():
    torch.manual_seed(0)
    meta = DataMeta(sample_shape=(4,), data_kind="spins")
    cfg = VDMConfig(num_timesteps=6, timestep_sampler="importance", importance_history=2, mlp_hidden=8, mlp_layers=1, emb_dim=8)
    m = VDM(cfg, meta)
    for step in range(6):
        out = m({"x": spins(16, (4,))}, StepContext(step, 0, 1, 0, 1))
        m.after_micro_step(out, lambda t: t)
        m.after_optimizer_step(lambda t: t)
    assert int(m.sampler.count.sum()) == 6 * 16
    assert bool((m.sampler.count >= 2).all())  # ready: p is no longer uniform
    assert not torch.allclose(m.sampler.probs(), torch.full((5,), 0.2, dtype=torch.float64))
    sd = m.state_dict()
    assert "sampler.loss_sq" in sd and "sampler.count" in sd
    fresh = VDM(cfg, meta)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.sampler.probs(), m.sampler.probs())
    out = fresh({"x": spins(16, (4,))}, CTX)
    assert "sampler_ess" in out.metrics() and 0 < out.metrics()["sampler_ess"] <= 1


def test_learned_schedule_gets_the_gradient_of_the_squared_loss():
    meta = DataMeta(sample_shape=(3,), data_kind="continuous")
    cfg = VDMConfig(num_timesteps=0, timestep_sampler="learned-schedule", mlp_hidden=8, mlp_layers=1, emb_dim=8)
    torch.manual_seed(0)
    m = VDM(cfg, meta)
    with torch.no_grad():
        m.denoiser.net.out.weight.normal_(0, 0.5)
    x = torch.randn(32, 3)
    to_bpd = 1 / (3 * math.log(2))
    torch.manual_seed(5)
    m({"x": x}, CTX).loss.backward()
    got_tm = [p.grad.clone() for p in m.time_map.net.parameters()]
    got_den = [p.grad.clone() for p in m.denoiser.parameters()]
    m.zero_grad()
    # Reference: the same random draws (recon noise, then the sampler, then the diffusion
    # noise), without the gradient rerouting.
    torch.manual_seed(5)
    torch.randn_like(x)
    u, _ = m.sampler(32, CTX)
    orig = terms._ScaleGrad.apply
    terms._ScaleGrad.apply = lambda t, holder: t
    try:
        diff, _, _, _ = m.diffusion_nats(x, u, None)
    finally:
        terms._ScaleGrad.apply = orig
    L = diff * to_bpd
    ref_tm = torch.autograd.grad((L**2).mean(), list(m.time_map.net.parameters()), retain_graph=True)
    ref_den = torch.autograd.grad(L.mean(), list(m.denoiser.parameters()), allow_unused=True)
    for a, b in zip(got_tm, ref_tm):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for a, b in zip(got_den, ref_den):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in got_tm)


def test_report_profiles_losses_over_t_and_resets():
    """The per-t profile equals a brute-force binning of the outputs it was fed; the ELBO
    moments equal numpy's; a report starts a new window."""
    import numpy as np

    (ph,) = build_phases(VDMConfig(channels=8, num_timesteps=0, timestep_sampler="importance"), ISING,
                         lr=1e-3, betas=(0.9, 0.99))
    m = ph.module
    ts, losses, elbos = [], [], []
    for step in range(3):
        out = m({"x": spins(16), "label": torch.full((16,), 2.27)},
                StepContext(step=step, micro_step=0, grad_accum_steps=1, rank=0, world_size=1))
        m.after_micro_step(out, lambda t: t)
        m.after_optimizer_step(lambda t: t)
        ts.append(out.t.numpy()), losses.append(out.diff_per_sample.numpy()), elbos.append(float(out.bits_per_dim))
    rep = m.report()
    prof = rep.profiles["vdm/t_profile"].as_dict()
    t, loss = np.concatenate(ts), np.concatenate(losses)
    bins = np.minimum((t * 20).astype(int), 19)
    assert prof["count"] == [int((bins == b).sum()) for b in range(20)]
    for b in range(20):
        if (bins == b).any():
            assert prof["mean"][b] == pytest.approx(float(loss[bins == b].mean()), rel=1e-5)
    assert rep.metrics["vdm/elbo_estimate/mean"] == pytest.approx(np.mean(elbos), rel=1e-6)
    assert rep.metrics["vdm/elbo_estimate/std"] == pytest.approx(np.std(elbos, ddof=1), rel=1e-5)
    assert 0 < rep.metrics["vdm/p_t/ess_fraction"] <= 1.0 + 1e-9  # uniform until history fills
    assert rep.metrics["vdm/gamma_t0.00"] == pytest.approx(-13.3, abs=1e-4)
    assert rep.metrics["vdm/gamma_t1.00"] == pytest.approx(5.0, abs=1e-4)
    assert sum(m.report().profiles["vdm/t_profile"].as_dict()["count"]) == 0
