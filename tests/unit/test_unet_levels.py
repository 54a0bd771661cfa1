"""``vdm.unet_levels``: UNets with more than one down-sampling level (models/unet.py), their
shapes, periodic equivariance, the reach of their convolutions, and the config's errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.config import ConfigError
from pipeline.models import UNet


def _net(ndim: int, levels: int, *, periodic: bool = True, channels: int = 4, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(1, channels, 8, periodic=periodic, ndim=ndim, levels=levels)
    with torch.no_grad():  # the output convolution starts at zero: every output would be 0
        net.out.weight.normal_()
        net.out.bias.normal_()
    return net


def _without_group_norm(net: nn.Module) -> nn.Module:
    """The net with every GroupNorm replaced by the identity: GroupNorm's statistics couple every
    site to every other, which would hide how far the convolutions themselves reach."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, nn.Identity())
    return net


def _reach(net: nn.Module, size: int) -> int:
    """The largest periodic distance (sites, Chebyshev) from site (0, 0) of an input that moves
    the output at (0, 0) of a [1, 1, size, size] field."""
    z = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    net(z, torch.randn(1, 8, dtype=torch.float64))[0, 0, 0, 0].backward()
    idx = torch.arange(size)
    dist = torch.minimum(idx, size - idx)
    cheb = torch.maximum(dist[:, None], dist[None, :])
    return int(cheb[z.grad[0, 0] != 0].max())


@pytest.mark.parametrize("ndim,spatial", [(1, (16,)), (2, (8, 16)), (3, (8, 8, 16))])
@pytest.mark.parametrize("levels", [2, 3])
def test_shapes_and_zero_init(ndim, spatial, levels):
    torch.manual_seed(0)
    net = UNet(2, 4, 8, ndim=ndim, levels=levels)
    assert len(net.deeper) == levels - 1
    z = torch.randn(3, 2, *spatial)
    out = net(z, torch.randn(3, 8))
    assert out.shape == z.shape
    assert torch.equal(out, torch.zeros_like(out))  # eps_hat = 0 at initialisation


def test_levels_1_is_the_network_without_the_argument():
    torch.manual_seed(5)
    a = UNet(1, 8, 16)
    torch.manual_seed(5)
    b = UNet(1, 8, 16, levels=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not any(k.startswith("deeper.") for k in b.state_dict())


def test_equivariant_to_circular_shifts_by_multiples_of_2_to_the_levels():
    net = _net(2, 3).double()
    z, emb = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        out = net(z, emb)
        for shift in ((8, -8), (0, 8)):
            shifted = net(torch.roll(z, shift, (2, 3)), emb)
            torch.testing.assert_close(shifted, torch.roll(out, shift, (2, 3)), atol=1e-10, rtol=1e-10)
        # A shift by 2 moves the deepest grid by a quarter of its site: not a symmetry.
        assert (net(torch.roll(z, (2, 0), (2, 3)), emb) - torch.roll(out, (2, 0), (2, 3))).abs().max() > 1e-3


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_more_levels_reach_the_whole_periodic_box(levels):
    # One level reaches 12 sites (inp 1 + enc 2 + down 1 + mid 2 x 2 + up 1 + dec 2 + out 1): on
    # a 32x32 box the sites 16 away (half the box's largest wavelength) are out of its reach.
    assert _reach(_without_group_norm(_net(2, 1).double()), 32) == 12
    assert _reach(_without_group_norm(_net(2, levels).double()), 32) == 16


def _vdm(shape, **cfg):
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.vdm import VDM, VDMConfig

    return VDM(VDMConfig(num_timesteps=0, channels=4, **cfg), DataMeta(sample_shape=shape, data_kind="continuous"))


def test_the_vdm_builds_trains_and_samples_with_levels():
    from pipeline.objectives.base import StepContext

    torch.manual_seed(0)
    m = _vdm((1, 16, 16), unet_levels=3)
    assert len(m.denoiser.net.deeper) == 2
    out = m({"x": torch.randn(4, 1, 16, 16)}, StepContext(0, 0, 1, 0, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.sample(2, num_steps=3).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("shape,cfg,says", [
    ((1, 12, 16), {"unet_levels": 3}, r"unet_levels=3 with vdm.periodic=true needs every spatial size a multiple of 8.*\(1, 12, 16\).*<= 2.*periodic=false"),
    ((1, 16), {"unet_levels": 2}, r"unet_levels=2 applies to the UNet.*MLP.*leave vdm.unet_levels at 1"),
    ((1, 16, 16), {"unet_levels": 0}, r"vdm.unet_levels must be positive, got 0"),
])
def test_config_errors_name_the_fix(shape, cfg, says):
    with pytest.raises(ConfigError, match=says):
        _vdm(shape, **cfg)
