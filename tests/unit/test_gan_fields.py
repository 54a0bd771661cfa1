"""GANs on continuous fields in 1-3 dimensions: the config's auto choices read the data's
manifest (a declared boundary makes (C, L) and (C, D, H, W) samples grids; periodic makes the
padding circular), and both phases train on [C, L] and [C, D, H, W] fields conditioned on a
continuous label."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.objectives.gan import GANConfig
from pipeline.objectives.gan.phases import build_phases


def _meta(shape, boundary=None, **kw) -> DataMeta:
    return DataMeta(sample_shape=shape, data_kind="continuous", boundary=boundary, **kw)


@pytest.mark.parametrize("shape,boundary,expected", [
    ((1, 16, 16), None, ("conv", "zeros", 1)),  # as before boundaries existed
    ((1, 16, 16), "periodic", ("conv", "circular", 1)),  # phi^4, 2D GRFs
    ((2, 64), "periodic", ("conv", "circular", 1)),  # 1D GRFs
    ((1, 8, 8, 8), "periodic", ("conv", "circular", 1)),  # 3D GRFs
    ((1, 8, 8, 8), "open", ("conv", "zeros", 1)),
    ((2, 64), None, ("mlp", "zeros", 1)),  # no boundary: a (C, L) array need not be a grid
    ((1, 8, 8, 8), None, ("mlp", "zeros", 1)),
    ((5,), None, ("mlp", "zeros", 1)),
])
def test_auto_choices_read_the_manifest(shape, boundary, expected):
    assert GANConfig().check_data(_meta(shape, boundary)) == expected


def test_explicit_choices_win_and_conv_needs_a_grid():
    assert GANConfig(arch="conv").check_data(_meta((1, 8, 8, 8))) == ("conv", "zeros", 1)
    assert GANConfig(padding="zeros").check_data(_meta((2, 64), "periodic")) == ("conv", "zeros", 1)
    with pytest.raises(ConfigError, match=r"\(C, L\), \(C, H, W\) or \(C, D, H, W\)"):
        GANConfig(arch="conv").check_data(_meta((5,)))


@pytest.mark.parametrize("shape", [(2, 16), (1, 8, 4, 8)])
def test_both_phases_train_on_fields_with_continuous_labels(shape):
    torch.manual_seed(0)
    meta = _meta(shape, "periodic", label_kind="continuous", label_values=(0.5, 1.5))
    cfg = GANConfig(loss="wgan-gp", conditional=True, channels=[4, 8], latent_dim=6, g_film=True, g_noise_inputs=True)
    d_phase, g_phase = build_phases(cfg, meta, (0.0, 0.9))
    D, G = d_phase.module.D, g_phase.module.G
    assert all(m.padding_mode == "circular" for m in D.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    batch = {"x": torch.randn(5, *shape), "label": torch.tensor([0.5, 1.5, 0.5, 1.5, 0.5])}
    out = d_phase.module(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.gradient_penalty > 0
    assert all(p.grad is not None for p in D.parameters())
    out = g_phase.module(batch)
    out.loss.backward()
    assert all(p.grad is not None for p in G.parameters())
    x = g_phase.module.sample(3, torch.tensor([0.5, 1.5, 0.5]))
    assert x.shape == (3, *shape) and torch.isfinite(x).all()
    # the label reaches the samples: the same latents under another label give other fields
    gen = torch.Generator().manual_seed(1)
    a = g_phase.module.sample(2, torch.tensor([0.5, 0.5]), generator=gen)
    gen = torch.Generator().manual_seed(1)
    b = g_phase.module.sample(2, torch.tensor([1.5, 1.5]), generator=gen)
    assert not torch.allclose(a, b)


def test_wgan_gp_phases_with_the_minibatch_std():
    """gan.d_minibatch_std through both phases: the D phase's one forward on [real, fake,
    interpolates] scores the reals as D does alone, the penalty and every gradient exist."""
    torch.manual_seed(0)
    meta = _meta((1, 4, 4), "periodic")
    cfg = GANConfig(loss="wgan-gp", arch="mlp", channels=[16, 16], latent_dim=6, d_minibatch_std=4)
    d_phase, g_phase = build_phases(cfg, meta, (0.0, 0.9))
    D, G = d_phase.module.D, g_phase.module.G
    batch = {"x": torch.randn(8, 1, 4, 4)}
    out = d_phase.module(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.gradient_penalty > 0
    assert all(p.grad is not None for p in D.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out.d_real, D(batch["x"]).mean())
    out = g_phase.module(batch)
    out.loss.backward()
    assert all(p.grad is not None for p in G.parameters())
