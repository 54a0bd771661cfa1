"""GAN losses, gradient penalty, phase wiring and metrics, against closed-form values."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from pipeline.config import ConfigError, build
from pipeline.data.meta import DataMeta
from pipeline.objectives.gan import (
    DStep,
    GANConfig,
    GStep,
    build_phases,
    d_loss_hinge,
    d_loss_logistic,
    d_loss_wasserstein,
    g_loss_critic,
    g_loss_minimax,
    g_loss_non_saturating,
    gradient_penalty,
    sample_latent,
    ssl_unsupervised_logit,
)
from pipeline.train.engines.half_weights import cast_inputs_to_weights

VEC = DataMeta(sample_shape=(1,), data_kind="continuous")


def softplus64(x: float) -> float:
    """log(1 + e^x) in float64, the independent reference."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class FixedG(nn.Module):
    """'Generator' that ignores h and returns given values (tests need known fakes)."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, so freezing/grad checks apply
        self.latent_dim = 1  # G's contract: the entries of h (ignored here)

    def forward(self, h, labels=None):
        assert h.shape[0] == self.values.shape[0]
        return self.values + 0.0 * self.w


class LinearCritic(nn.Module):
    """f(x) = <w, x> + b: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(len(w), 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w], dtype=torch.float32))
            self.lin.bias.fill_(0.3)

    def forward(self, x, labels=None):
        return self.lin(x.flatten(1))


class IdentityD(nn.Module):
    """Logit = the 1-D sample itself."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, labels=None):
        return x.reshape(-1, 1) * self.scale


# ---------------------------------------------------------------------------------------
# Known values


def test_known_values_at_logit_one():
    one = torch.ones(7)
    # Published/hand values: softplus(-1) = 0.3133, softplus(1) = 1.3133.
    assert g_loss_non_saturating(one).item() == pytest.approx(0.3133, abs=1e-4)
    assert g_loss_minimax(one).item() == pytest.approx(-1.3133, abs=1e-4)
    assert g_loss_minimax(one).item() == pytest.approx(math.log(1 - 1 / (1 + math.exp(-1))), rel=1e-6)
    assert d_loss_logistic(one, one).item() == pytest.approx(1.6265, abs=1e-4)
    assert d_loss_logistic(one, one).item() == pytest.approx(softplus64(-1) + softplus64(1), rel=1e-6)


def test_logistic_losses_match_float64_formula_and_stay_finite_at_extreme_logits():
    logits = [-200.0, -30.0, -1.5, 0.0, 2.0, 40.0, 200.0]
    t = torch.tensor(logits)
    for r in logits:
        ref = sum(softplus64(-r) + softplus64(f) for f in logits) / len(logits)
        val = d_loss_logistic(torch.full((len(logits),), r), t).item()
        assert math.isfinite(val) and val == pytest.approx(ref, rel=1e-5)
    assert g_loss_minimax(t).item() == pytest.approx(-sum(softplus64(f) for f in logits) / 7, rel=1e-5)
    assert g_loss_non_saturating(t).item() == pytest.approx(sum(softplus64(-f) for f in logits) / 7, rel=1e-5)


def test_generator_gradients_show_saturation_of_minimax():
    # d/dl log(1 - sigmoid(l)) = -sigmoid(l): vanishes when D rejects fakes (l -> -inf);
    # the non-saturating loss' gradient -(1 - sigmoid(l)) stays near -1 there.
    f = torch.tensor([-8.0, -2.0, 0.0, 3.0], requires_grad=True)
    (gm,) = torch.autograd.grad(g_loss_minimax(f), f)
    (gn,) = torch.autograd.grad(g_loss_non_saturating(f), f)
    s = torch.sigmoid(f.detach())
    torch.testing.assert_close(gm, -s / 4)
    torch.testing.assert_close(gn, -(1 - s) / 4)
    assert abs(gm[0]) < 1e-3 < abs(gn[0])


def test_critic_losses():
    r = torch.tensor([2.0, 0.5, -1.0])
    f = torch.tensor([-3.0, 0.0, 1.5])
    assert d_loss_wasserstein(r, f).item() == pytest.approx(f.mean().item() - r.mean().item())
    # hinge: mean(max(0, 1 - r)) + mean(max(0, 1 + f)) computed by hand
    expected = (0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3
    assert d_loss_hinge(r, f).item() == pytest.approx(expected)
    assert g_loss_critic(f).item() == pytest.approx(-f.mean().item())


def test_ssl_unsupervised_logit_is_logit_of_one_minus_fake_class_probability():
    # K+1-class softmax with l_{K+1} = 0: 1 - p(K+1|x) = Z/(Z+1) must equal sigmoid(logit).
    logits = torch.tensor([[0.3, -1.2, 2.0], [-5.0, -4.0, -6.0]], dtype=torch.float64)
    full = torch.cat([logits, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    p_fake = torch.softmax(full, dim=1)[:, -1]
    torch.testing.assert_close(torch.sigmoid(ssl_unsupervised_logit(logits)), 1 - p_fake)


# ---------------------------------------------------------------------------------------
# Gradient penalty


def test_gradient_penalty_zero_for_unit_gradient_critic():
    critic = LinearCritic([0.6, -0.8])  # |w| = 1
    x = torch.randn(16, 2, requires_grad=True)
    assert gradient_penalty(critic(x), x).item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_of_quadratic_critic_matches_formula():
    # f(x) = sum x^2 -> grad 2x, penalty mean (2|x| - 1)^2
    x = torch.tensor([[0.1, 0.2], [1.0, -2.0], [0.0, 0.5]], requires_grad=True)
    gp = gradient_penalty((x ** 2).sum(1), x)
    expected = ((2 * x.detach().norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-6)
    assert gp.item() > 0


def test_dstep_wgan_gp_loss_and_penalty_gradient_exact_for_linear_critic():
    cfg = GANConfig(loss="wgan-gp", latent_dim=3, gp_weight=10.0)
    meta = DataMeta(sample_shape=(2,), data_kind="continuous")
    w = torch.tensor([1.2, -1.6])  # |w| = 2
    D = LinearCritic(w.tolist())
    fakes = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.5], [0.3, 0.3]])
    step = DStep(D, FixedG(fakes), cfg, meta)
    real = torch.tensor([[1.0, 0.0], [0.5, -0.5], [3.0, 1.0], [0.0, 0.0]])
    out = step({"x": real})
    m = out.metrics()
    assert m["gradient_penalty"] == pytest.approx((2.0 - 1.0) ** 2, rel=1e-6)
    w_est = (real @ w).mean() - (fakes @ w).mean()
    assert m["wasserstein_estimate"] == pytest.approx(w_est.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(-w_est.item() + 10.0 * 1.0, rel=1e-5)
    # d loss / d w = mean(fake) - mean(real) + lambda * 2 (|w| - 1) w / |w|  (create_graph works)
    out.loss.backward()
    expected = fakes.mean(0) - real.mean(0) + 10.0 * 2 * (2.0 - 1.0) * w / 2.0
    torch.testing.assert_close(D.lin.weight.grad[0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Phase wiring


def _phases(**kw):
    meta = kw.pop("meta", DataMeta(sample_shape=(1, 8, 8), data_kind="spins"))
    return build_phases(GANConfig(channels=[8, 16], latent_dim=4, **kw), meta, betas=(0.5, 0.9)), meta


def test_build_phases_contract():
    (d, g), _ = _phases(n_critic=3, lr_d=1e-3, lr_g=5e-4)
    assert (d.name, d.repeats, d.lr, d.ema, d.betas) == ("d", 3, 1e-3, False, (0.5, 0.9))
    assert (g.name, g.repeats, g.lr, g.ema) == ("g", 1, 5e-4, True)
    D, G = d.module.D, g.module.G
    assert d.frozen == [G] and g.frozen == [D]
    assert d.module.G is G and g.module.D is D
    # each phase's parameters are exactly its own network's
    assert {id(p) for p in d.module.parameters()} == {id(p) for p in D.parameters()}
    assert {id(p) for p in g.module.parameters()} == {id(p) for p in G.parameters()}
    assert [n for n, _ in d.module.named_children()] == ["D"]
    assert [n for n, _ in g.module.named_children()] == ["G"]
    assert all(k.startswith("G.") for k in g.module.state_dict())
    # the EMA deep copy copies G and keeps pointing at the live D
    ema = copy.deepcopy(g.module)
    assert ema.D is D and ema.G is not G
    (d2, _), _ = _phases(betas=(0.0, 0.9))
    assert d2.betas == (0.0, 0.9)


@pytest.mark.parametrize("loss", ["minimax", "non-saturating", "wgan-gp", "hinge"])
def test_one_forward_of_d_per_step_and_gradients_reach_only_the_training_network(loss):
    (d, g), meta = _phases(loss=loss)
    D, G = d.module.D, g.module.G
    calls = []
    hook = D.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randint(0, 2, (6, 1, 8, 8)).float() * 2 - 1
    G.requires_grad_(False)
    d.module({"x": x}, None).loss.backward()
    G.requires_grad_(True)
    assert calls == [12 if loss != "wgan-gp" else 18]  # real+fake(+interpolates) in ONE forward
    assert all(p.grad is not None for p in D.parameters())
    assert all(p.grad is None for p in G.parameters())
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    g.module({"x": x}, None).loss.backward()
    D.requires_grad_(True)
    hook.remove()
    assert all(p.grad is None for p in D.parameters())
    assert sum(p.grad.abs().sum() for p in G.parameters()) > 0  # through the frozen D


@pytest.mark.parametrize("loss", ["minimax", "non-saturating", "wgan-gp", "hinge"])
def test_metric_keys_are_fixed_per_loss(loss):
    (d, g), _ = _phases(loss=loss)
    x = torch.randint(0, 2, (4, 1, 8, 8)).float() * 2 - 1
    keys = [set(d.module({"x": x}, None).metrics()) for _ in range(2)]
    assert keys[0] == keys[1]
    common = {"loss_d", "d_real", "d_fake", "fake_detected_fraction", "diversity_ratio", "g_collapsed"}
    assert common <= keys[0]
    if loss in ("minimax", "non-saturating"):
        assert {"js_estimate", "d_dominates"} <= keys[0] and "wasserstein_estimate" not in keys[0]
    else:
        assert "wasserstein_estimate" in keys[0] and "js_estimate" not in keys[0]
    assert ("gradient_penalty" in keys[0]) == (loss == "wgan-gp")
    assert set(g.module({"x": x}, None).metrics()) == {"loss_g", "d_fake"}


def test_logistic_metrics_against_hand_computation():
    fakes = torch.tensor([[-3.0], [-1.0], [2.0], [5.0]])
    real = torch.tensor([[1.0], [-0.5], [4.0], [0.2]])
    step = DStep(IdentityD(), FixedG(fakes), GANConfig(loss="minimax", latent_dim=1), VEC)
    m = step({"x": real}).metrics()
    r, f = real.squeeze(1).double(), fakes.squeeze(1).double()
    L = torch.log(torch.sigmoid(r)).mean() + torch.log(1 - torch.sigmoid(f)).mean()
    assert m["loss_d"] == pytest.approx(-L.item(), rel=1e-5)
    assert m["js_estimate"] == pytest.approx((L.item() + math.log(4)) / 2, rel=1e-5)
    assert m["d_real"] == pytest.approx(torch.sigmoid(r).mean().item(), rel=1e-5)
    assert m["d_fake"] == pytest.approx(torch.sigmoid(f).mean().item(), rel=1e-5)
    assert m["fake_detected_fraction"] == 0.5  # logits -3, -1 < 0
    assert m["real_detected_fraction"] == 0.75
    assert m["d_dominates"] == 0.0  # mean D(G(h)) ~ 0.38
    pd = torch.cdist(fakes, fakes).sum() / 12
    pr = torch.cdist(real, real).sum() / 12
    assert m["diversity_ratio"] == pytest.approx((pd / pr).item(), rel=1e-5)
    assert m["g_collapsed"] == 0.0


def test_flags_fire_on_dominating_d_and_collapsed_g():
    fakes = torch.full((8, 1), -6.0)  # every fake identical, D(G(h)) = sigmoid(-6) = 0.0025
    step = DStep(IdentityD(), FixedG(fakes), GANConfig(loss="non-saturating", latent_dim=1), VEC)
    m = step({"x": torch.linspace(-1, 1, 8)[:, None]}).metrics()
    assert m["d_dominates"] == 1.0 and m["fake_detected_fraction"] == 1.0
    assert m["diversity_ratio"] == 0.0 and m["g_collapsed"] == 1.0


def test_wgan_fake_detection_uses_midpoint_threshold():
    # critic scores are shift-invariant: shift all scores by +100, detection must not change
    fakes = torch.tensor([[98.0], [99.0], [103.0]])
    real = torch.tensor([[104.0], [102.0], [100.0]])
    step = DStep(IdentityD(), FixedG(fakes), GANConfig(loss="wgan-gp", latent_dim=1), VEC)
    m = step({"x": real}).metrics()
    # midpoint = (102 + 100) / 2 = 101: fakes 98, 99 detected; reals 104, 102 detected
    assert m["fake_detected_fraction"] == pytest.approx(2 / 3)
    assert m["real_detected_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("loss", ["non-saturating", "wgan-gp"])
def test_mixed_precision_autocast_and_bf16_weights(loss):
    meta = DataMeta(sample_shape=(1, 8, 8), data_kind="spins", label_kind="continuous", label_values=(2.0, 3.0))
    (d, g), _ = _phases(meta=meta, loss=loss, conditional=True, spectral_norm=True)
    batch = {"x": torch.randint(0, 2, (4, 1, 8, 8)).float() * 2 - 1, "label": torch.tensor([2.0, 3.0, 2.0, 3.0])}
    for phase in (d, g):  # Accelerate: autocast around fp32 weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = phase.module(batch, None)
        assert out.loss.dtype == torch.float32  # losses computed on float32 logits
        out.loss.backward()
        grads = [p.grad for p in phase.module.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
    # DeepSpeed bf16: the weights themselves are bf16; the engine casts the float32 inputs where
    # they meet them (train/engines/half_weights.py), the objective does nothing for it
    d.module.D.to(torch.bfloat16)
    g.module.G.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):  # without the engine's cast
        d.module(batch, None)
    cast_inputs_to_weights(d.module.D)
    cast_inputs_to_weights(g.module.G)
    for phase in (d, g):
        out = phase.module(batch, None)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    s = g.module.sample(3, torch.tensor([2.0, 2.5, 3.0]))
    assert s.dtype == torch.float32 and set(s.unique().tolist()) <= {-1.0, 1.0}


# ---------------------------------------------------------------------------------------
# Data space and sampling


def test_levels_round_trip_and_sample_ranges():
    (d, g), meta = _phases(meta=DataMeta(sample_shape=(1, 8, 8), data_kind="levels", num_levels=4))
    levels = torch.arange(4.0)
    dm = g.module.data_map
    torch.testing.assert_close(dm.to_model(levels), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(dm.to_data(dm.to_model(levels)), levels)
    s = g.module.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 8, 8) and s.dtype == torch.float32
    assert set(s.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_spin_samples_are_signs_and_seeded():
    (_, g), _ = _phases()
    s1 = g.module.sample(6, generator=torch.Generator().manual_seed(1))
    s2 = g.module.sample(6, generator=torch.Generator().manual_seed(1))
    s3 = g.module.sample(6, generator=torch.Generator().manual_seed(2))
    assert set(s1.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(s1, s2)
    # the sign of the tanh output the generator trains with, at h ~ U(-1, 1) from the seed
    h1 = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    h3 = torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        y1, y3 = g.module.G(h1), g.module.G(h3)
    torch.testing.assert_close(s1, torch.where(y1 >= 0, 1.0, -1.0))
    torch.testing.assert_close(s3, torch.where(y3 >= 0, 1.0, -1.0))
    assert not torch.allclose(y1, y3)  # another seed, other latents


def test_gan_sample_refuses_num_steps_but_takes_none():
    (_, g), _ = _phases()
    with pytest.raises(ValueError, match="--num-steps applies to VDM samplers; a GAN's generator samples in one pass"):
        g.module.sample(3, num_steps=5, generator=torch.Generator().manual_seed(1))
    a = g.module.sample(3, num_steps=None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, g.module.sample(3, generator=torch.Generator().manual_seed(1)))


def test_conditional_sampling_uses_labels():
    meta = DataMeta(sample_shape=(3,), data_kind="continuous", label_kind="class", num_classes=5)
    (d, g), _ = _phases(meta=meta, conditional=True)
    a = g.module.sample(4, torch.tensor([0, 0, 0, 0]), generator=torch.Generator().manual_seed(0))
    b = g.module.sample(4, torch.tensor([3, 3, 3, 3]), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    assert g.module.sample(7).shape == (7, 3)  # labels drawn uniformly when not given
    with pytest.raises(ValueError, match="0..4"):
        g.module.sample(2, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="shape"):
        g.module.sample(2, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="label"):
        d.module({"x": torch.randn(4, 3)}, None)  # conditional D step without labels
    # continuous labels without known values must be given explicitly
    meta_t = DataMeta(sample_shape=(3,), data_kind="continuous", label_kind="continuous")
    (_, gt), _ = _phases(meta=meta_t, conditional=True)
    with pytest.raises(ValueError, match="pass labels"):
        gt.module.sample(2)
    assert gt.module.sample(2, torch.tensor([2.0, 3.0])).shape == (2, 3)


# ---------------------------------------------------------------------------------------
# Config and data checks


def test_config_errors_name_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match="minimax.*non-saturating.*wgan-gp.*hinge"):
        build(GANConfig, {"loss": "wgan"}, prefix="gan")
    with pytest.raises(ConfigError, match="semi_supervised"):
        build(GANConfig, {"semi_supervised": "mixed", "loss": "wgan-gp"}).validate()
    with pytest.raises(ConfigError, match="conditional"):
        build(GANConfig, {"semi_supervised": "labelled", "conditional": True}).validate()
    with pytest.raises(ConfigError, match="labelled_fraction"):
        GANConfig(semi_supervised="mixed", labelled_fraction=0.95, heldout_fraction=0.1).validate()
    with pytest.raises(ConfigError, match="n_critic"):
        GANConfig(n_critic=0).validate()
    with pytest.raises(ConfigError, match="channels"):
        GANConfig(channels=[]).validate()
    with pytest.raises(ConfigError, match="g_convs_per_stage must be >= 1"):
        GANConfig(g_convs_per_stage=0).validate()
    assert build(GANConfig, {"betas": [0.0, 0.9]}).betas == (0.0, 0.9)


def test_gan_config_imports_neither_torch_nor_numpy():
    # A fresh interpreter: this one has torch loaded already.
    code = ("import sys; from pipeline.objectives.gan.config import GANConfig; GANConfig().validate(); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_data_mismatches_are_value_errors():
    with pytest.raises(ValueError, match="no labels"):
        _phases(meta=VEC, conditional=True)
    with pytest.raises(ValueError, match="class labels"):
        _phases(meta=VEC, semi_supervised="mixed")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        _phases(meta=DataMeta(sample_shape=(5,), data_kind="continuous"), arch="conv")
    with pytest.raises(ValueError, match="divisible"):
        _phases(meta=DataMeta(sample_shape=(1, 6, 6), data_kind="spins"))


def test_bernoulli_spin_output_draws_spins_with_mean_y_and_passes_g_gradient_straight_through():
    from pipeline.objectives.gan.noise import _draw_spins

    # Independent reference: the drawn spins' mean at each site is y (binomial frequency).
    y = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.95]).repeat(20000, 1)
    s = _draw_spins(y, torch.rand(y.shape, generator=torch.Generator().manual_seed(0)))
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    stderr = (1 - y[0] ** 2).sqrt() / 20000 ** 0.5
    assert ((s.mean(0) - y[0]).abs() < 4 * stderr + 1e-9).all()

    (d, g), _ = _phases(spin_output="bernoulli")
    D, G = d.module.D, g.module.G
    seen = []
    hook = D.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    x = torch.randint(0, 2, (6, 1, 8, 8)).float() * 2 - 1
    d.module({"x": x}, None)
    D.requires_grad_(False)
    g.module({"x": x}, None).loss.backward()
    D.requires_grad_(True)
    hook.remove()
    for fake in (seen[0][6:], seen[1]):  # D sees +-1 lattices in both phases
        assert set(fake.unique().tolist()) <= {-1.0, 1.0}
    assert sum(p.grad.abs().sum() for p in G.parameters()) > 0
    # sample(): +-1 spins, reproducible from the generator, not sign(y): with y = tanh of a
    # fresh G's output near 0, a draw differs from sign(y) at many sites.
    a = g.module.sample(8, generator=torch.Generator().manual_seed(1))
    b = g.module.sample(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {-1.0, 1.0}
    h = sample_latent(8, 4, "uniform", "cpu", torch.Generator().manual_seed(1))
    assert not torch.equal(a, torch.where(G(h) >= 0, 1.0, -1.0))


def test_spin_options_refuse_other_data():
    meta = DataMeta(sample_shape=(1, 8, 8), data_kind="levels", num_levels=4)
    with pytest.raises(ValueError, match="spin_output='bernoulli' needs spin data"):
        _phases(meta=meta, spin_output="bernoulli")
    with pytest.raises(ValueError, match="d_lattice_observables=true needs spin lattices"):
        _phases(meta=meta, d_lattice_observables=True)


def test_noise_input_generator_trains_and_samples_with_its_longer_latent():
    (d, g), _ = _phases(g_noise_inputs=True)
    G = g.module.G
    assert G.latent_dim == 4 + 4 * 4 + 8 * 8
    x = torch.randint(0, 2, (3, 1, 8, 8)).float() * 2 - 1
    d.module({"x": x}, None)
    g.module({"x": x}, None).loss.backward()
    assert all(s.grad is not None for s in G.noise_strength)
    a = g.module.sample(5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, g.module.sample(5, generator=torch.Generator().manual_seed(0)))


def test_matched_observables_of_spin_means_are_the_exact_expectation_over_the_draw():
    from itertools import product

    from pipeline.models.gan_features import lattice_observables
    from pipeline.objectives.gan.matching import matched_observables

    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(3, 1, 5, 4, generator=g) < 0.6, 1.0, -1.0)
    assert torch.equal(matched_observables(x), lattice_observables(x)[:, [0, 2, 3, 5]])  # c1, c_diag, c2, m^2
    # Reference: all 2^9 spin configurations of a 3x3 periodic lattice, each weighted by its
    # probability under independent sites with means y - the expectation and its gradient.
    y = (torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    configs = torch.tensor(list(product([-1.0, 1.0], repeat=9)), dtype=torch.float64).view(-1, 1, 3, 3)
    p_up = (1 + y) / 2  # [2, 1, 3, 3]
    prob = torch.where(configs[None] > 0, p_up[:, None], 1 - p_up[:, None]).flatten(2).prod(dim=2)  # [2, 512]
    want = prob @ lattice_observables(configs)[:, [0, 2, 3, 5]]
    got = matched_observables(y, spin_means=True)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(4, dtype=torch.float64, generator=g)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), y)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), y)
    assert torch.allclose(grad_got, grad_want, rtol=1e-10, atol=1e-12)
    # m^2 of the means alone would miss the i = j terms (s_i^2 = 1)
    assert not torch.allclose(matched_observables(y)[:, 3], want[:, 3], atol=1e-3)


def test_observable_matching_is_an_unbiased_label_weighted_squared_gap_of_mean_observables():
    from pipeline.objectives.gan.matching import matched_observables, observable_matching

    g = torch.Generator().manual_seed(0)
    real = torch.where(torch.rand(10, 1, 6, 6, generator=g) < 0.8, 1.0, -1.0)
    fake = torch.tanh(torch.randn(10, 1, 6, 6, generator=g)).requires_grad_(True)
    labels = torch.tensor([2.0] * 3 + [3.0] * 7)
    fo, ro = (matched_observables(x).detach().double() for x in (fake, real))

    def brute(a, b):  # squared linear-kernel MMD from explicit pairs i != j (Gretton et al. 2012, eq. 3)
        n = len(a)
        k = lambda x, y: sum(float(x[i] @ y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return k(a, a) + k(b, b) - 2 * k(a, b)

    want = 0.3 * brute(fo[:3], ro[:3]) + 0.7 * brute(fo[3:], ro[3:])
    got = observable_matching(matched_observables(fake), matched_observables(real), labels)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert fake.grad.abs().sum() > 0
    # Unbiased: averaged over many batches drawn from one distribution it is ~0, while the
    # plain squared gap of the batch means is ~ 2 Var(mean) > 0.
    p = torch.full((4000, 1, 6, 6), 0.7)
    a, b = (matched_observables(torch.where(torch.rand(p.shape, generator=g) < p, 1.0, -1.0)) for _ in range(2))
    values = torch.stack([observable_matching(a[i:i + 8], b[i:i + 8], None) for i in range(0, 4000, 8)])
    plain = torch.stack([((a[i:i + 8].mean(0) - b[i:i + 8].mean(0)) ** 2).sum() for i in range(0, 4000, 8)])
    assert abs(values.mean()) < 3 * values.std() / len(values) ** 0.5
    assert plain.mean() > 10 * plain.std() / len(plain) ** 0.5
    # matching is within each label, not across: reals of another label give a positive gap
    far = torch.where(torch.rand(10, 1, 6, 6, generator=g) < 0.5, 1.0, -1.0)
    assert observable_matching(matched_observables(real), matched_observables(torch.cat([real[:3], far[3:]])),
                               labels).item() > 0
    # the G phase adds it to its loss and reports it
    meta = DataMeta(sample_shape=(1, 8, 8), data_kind="spins", label_kind="continuous", label_values=(2.0, 3.0))
    (_, gp), _ = _phases(meta=meta, conditional=True, g_observable_matching=2.0)
    x = torch.randint(0, 2, (4, 1, 8, 8)).float() * 2 - 1
    o = gp.module({"x": x, "label": torch.tensor([2.0, 3.0, 2.0, 3.0])}, None)
    assert o.loss.item() == pytest.approx(o.loss_g.item() + 2.0 * o.observable_matching.item(), rel=1e-6)
    with pytest.raises(ValueError, match="g_observable_matching"):
        _phases(meta=DataMeta(sample_shape=(1, 8, 8), data_kind="levels", num_levels=4), g_observable_matching=1.0)


class _Quadratic(nn.Module):
    """D(x) = 0.5 x^2 + x (not symmetric: the symmetric wrapper's D' is 0.5 x^2)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, labels=None):
        return (0.5 * x**2 + self.w * x).flatten(1).sum(1, keepdim=True)


def test_sign_symmetric_critic_interpolates_each_real_with_its_fake_on_the_same_side():
    """gan.d_sign_symmetric: WGAN-GP's interpolates lie between each real sample and its fake
    flipped to the real's sign (for D' with D'(-x) = D'(x) that is the same point), never on
    the line through 0 between opposite-sign pairs; without the option they do."""
    from pipeline.models.gan_symmetry import SignSymmetricDiscriminator

    real = torch.tensor([[2.0], [-1.0], [0.5], [-4.0]])
    fakes = torch.tensor([[-3.0], [-2.0], [1.5], [5.0]])
    aligned = torch.tensor([[3.0], [-2.0], [1.5], [-5.0]])
    D = SignSymmetricDiscriminator(_Quadratic())
    for _ in range(5):
        step = DStep(D, FixedG(fakes), GANConfig(loss="wgan-gp", latent_dim=1, g_sign_symmetric=True,
                                                 d_sign_symmetric=True), VEC)
        x = step._interpolates(real, fakes, step._noise(None)).detach()
        assert ((x >= torch.minimum(real, aligned)) & (x <= torch.maximum(real, aligned))).all(), x
        plain = DStep(D, FixedG(fakes), GANConfig(loss="wgan-gp", latent_dim=1), VEC)
        y = plain._interpolates(real, fakes, plain._noise(None)).detach()
        assert (y[[0, 3]].abs() < real[[0, 3]].abs()).any() or (y[[0, 3]].sign() != real[[0, 3]].sign()).any()
    # D' = (D(x) + D(-x)) / 2 = 0.5 x^2: the critic's scores and the loss see only |x|
    out = step({"x": real})
    w_est = (0.5 * real**2).mean() - (0.5 * fakes**2).mean()
    assert out.metrics()["wasserstein_estimate"] == pytest.approx(w_est.item(), rel=1e-6)
    out.loss.backward()  # the linear part cancels in D': no gradient reaches it
    assert D.d.w.grad is not None and float(D.d.w.grad.abs()) < 1e-6


def test_sign_symmetric_critic_needs_a_sign_symmetric_generator():
    meta = DataMeta(sample_shape=(1, 8, 8), data_kind="continuous", boundary="periodic")
    with pytest.raises(ConfigError, match="d_sign_symmetric=true needs gan.g_sign_symmetric=true"):
        GANConfig(channels=[8], arch="mlp", d_sign_symmetric=True).validate()
    assert GANConfig(channels=[8], arch="mlp", d_sign_symmetric=True, g_sign_symmetric=True).check_data(meta)
