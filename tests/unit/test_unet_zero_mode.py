"""``vdm.zero_mode``: the UNet's k = 0 path (models/unet.py), eps_hat's per-channel spatial mean
A(emb) zbar + b(emb): zero at initialisation, exactly that form after training, the crop of
zero-padded sizes, and the config's error under the MLP."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.meta import DataMeta
from pipeline.models import UNet
from pipeline.objectives.vdm import VDM, VDMConfig


def _pair(ndim: int, in_channels: int = 2, **kw) -> tuple[UNet, UNet]:
    """The same UNet without and with the path (same seed: the path is created last)."""
    nets = []
    for zero_mode in (False, True):
        torch.manual_seed(3)
        nets.append(UNet(in_channels, 4, 8, ndim=ndim, zero_mode=zero_mode, **kw).double())
    plain, zm = nets
    with torch.no_grad():  # the output convolution starts at zero: give the conv path an output
        for net in nets:
            torch.manual_seed(4)
            net.out.weight.normal_()
            net.out.bias.normal_()
    return plain, zm


@pytest.mark.parametrize("ndim,spatial", [(1, (16,)), (2, (8, 16)), (3, (4, 8, 8))])
def test_zero_at_initialisation_the_plain_unet(ndim, spatial):
    plain, zm = _pair(ndim)
    z, emb = torch.randn(3, 2, *spatial, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(zm(z, emb), plain(z, emb))
    # The shared weights are the plain network's: the path's are the only extra ones.
    extra = set(zm.state_dict()) - set(plain.state_dict())
    assert extra == {"zero_mode.lin.weight", "zero_mode.lin.bias"}


@pytest.mark.parametrize("ndim,spatial,periodic", [(2, (8, 16), True), (3, (4, 8, 8), True),
                                                   (2, (7, 5), False)])  # padded to 8 x 6 and cropped
def test_the_path_adds_a_per_channel_constant_linear_in_the_input_mean(ndim, spatial, periodic):
    plain, zm = _pair(ndim, periodic=periodic)
    with torch.no_grad():
        zm.zero_mode.lin.weight.normal_()
        zm.zero_mode.lin.bias.normal_()
    z, emb = torch.randn(3, 2, *spatial, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    diff = zm(z, emb) - plain(z, emb)
    # By hand: the mean over the sample's own sites (not the zeros it was padded with).
    w = emb @ zm.zero_mode.lin.weight.T + zm.zero_mode.lin.bias  # [3, 6]
    gain, offset = w[:, :4].reshape(3, 2, 2), w[:, 4:]
    zbar = z.reshape(3, 2, -1).mean(-1)
    expect = torch.einsum("bij,bj->bi", gain, zbar) + offset
    assert torch.allclose(diff, expect.reshape(3, 2, *(1,) * ndim).expand_as(diff), atol=1e-10)
    # Linear in the mean only: a zero-mean change of the input leaves the path's output alone.
    dz = torch.randn_like(z)
    dz -= dz.reshape(3, 2, -1).mean(-1).reshape(3, 2, *(1,) * ndim)
    assert torch.allclose(zm.zero_mode(z + dz, emb), zm.zero_mode(z, emb), atol=1e-12)


def _vdm(shape, **cfg) -> VDM:
    return VDM(VDMConfig(num_timesteps=0, channels=4, **cfg), DataMeta(sample_shape=shape, data_kind="continuous"))


def test_the_vdm_trains_the_path_and_samples():
    from pipeline.objectives.base import StepContext

    torch.manual_seed(0)
    m = _vdm((1, 16, 16), zero_mode=True)
    out = m({"x": torch.randn(4, 1, 16, 16) + 2.0}, StepContext(0, 0, 1, 0, 1))
    out.loss.backward()
    # The path's gradient is the k = 0 part of the loss's: nonzero for data with a mean.
    assert m.denoiser.net.zero_mode.lin.bias.grad.abs().sum() > 0
    assert m.sample(2, num_steps=3).shape == (2, 1, 16, 16)


def test_zero_mode_under_the_mlp_names_the_fix():
    with pytest.raises(ConfigError, match=r"vdm.zero_mode=true applies to the UNet; samples \(1, 16\) get the MLP"
                                          r".*set vdm.zero_mode=false"):
        _vdm((1, 16), zero_mode=True)
