"""The UNet in 1, 2 and 3 spatial dimensions: shapes, periodic padding, zero init, gradients,
and (ndim=2) bitwise the network it was before ndim existed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import UNet

# Spatial shapes per ndim: even sizes (one stride-2 level), unequal so axes cannot be confused.
SPATIAL = {1: (12,), 2: (8, 6), 3: (4, 6, 8)}


# ----------------------------------------------------------------- reference: the 2D UNet
# Copied verbatim from pipeline/models/unet.py before the ndim argument was added (commit
# a65f32e), renamed; it is the record that ndim=2 must reproduce bit for bit.


def _ref_groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _RefResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, padding_mode: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(_ref_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_ref_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _RefUNet(nn.Module):
    def __init__(self, in_channels: int, channels: int = 16, emb_dim: int = 64, periodic: bool = True):
        super().__init__()
        pm = "circular" if periodic else "zeros"
        c, c2 = channels, 2 * channels
        self.inp = nn.Conv2d(in_channels, c, 3, padding=1, padding_mode=pm)
        self.enc = _RefResBlock(c, c, emb_dim, pm)
        self.down = nn.Conv2d(c, c2, 3, stride=2, padding=1, padding_mode=pm)
        self.mid = _RefResBlock(c2, c2, emb_dim, pm)
        self.up = nn.ConvTranspose2d(c2, c, 2, stride=2)
        self.dec = _RefResBlock(2 * c, c, emb_dim, pm)
        self.out_norm = nn.GroupNorm(_ref_groups(c), c)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1, padding_mode=pm)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h0 = self.enc(self.inp(z), emb)
        h = self.mid(self.down(h0), emb)
        h = self.dec(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


# ------------------------------------------------------------------------------- helpers


def _net(ndim: int, periodic: bool = True, in_channels: int = 2, channels: int = 8, emb_dim: int = 16,
         seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels, channels, emb_dim, periodic=periodic, ndim=ndim)


def _randomise_output(net: nn.Module) -> None:
    # The output convolution starts at zero, so an untouched net maps everything to 0 and
    # would pass any equivariance test trivially.
    with torch.no_grad():
        net.out.weight.normal_()
        net.out.bias.normal_()


def _inputs(ndim: int, batch: int = 3, in_channels: int = 2, emb_dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, *SPATIAL[ndim], generator=g), torch.randn(batch, emb_dim, generator=g)


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("in_channels,channels", [(1, 8), (3, 6)])
def test_ndim2_is_bitwise_the_previous_unet(periodic, in_channels, channels):
    torch.manual_seed(123)
    ref = _RefUNet(in_channels, channels, 16, periodic=periodic)
    new = _net(2, periodic, in_channels, channels, seed=123)
    ref_sd, new_sd = ref.state_dict(), new.state_dict()
    assert list(new_sd) == list(ref_sd)  # same names in the same (creation) order
    for k in ref_sd:
        assert new_sd[k].shape == ref_sd[k].shape and torch.equal(new_sd[k], ref_sd[k]), k
    _randomise_output(ref)
    new.load_state_dict(ref.state_dict())  # a non-zero output layer, so the outputs say something
    z, emb = _inputs(2, in_channels=in_channels)
    z.requires_grad_(True)
    out_ref = ref(z, emb)
    (g_ref,) = torch.autograd.grad(out_ref.square().sum(), z)
    out_new = new(z, emb)
    (g_new,) = torch.autograd.grad(out_new.square().sum(), z)
    assert out_ref.abs().max() > 0
    assert torch.equal(out_new, out_ref) and torch.equal(g_new, g_ref)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_output_shape_and_zero_init(ndim):
    net = _net(ndim)
    z, emb = _inputs(ndim)
    out = net(z, emb)
    assert out.shape == z.shape == (3, 2, *SPATIAL[ndim])
    assert torch.equal(out, torch.zeros_like(out))  # eps_hat = 0 at initialisation
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    assert isinstance(net.inp, conv) and isinstance(net.out, conv) and isinstance(net.enc.conv1, conv)
    assert isinstance(net.up, {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[ndim])


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gradients_reach_every_parameter(ndim):
    net = _net(ndim)
    z, emb = _inputs(ndim)
    emb.requires_grad_(True)
    # At init only the output layer gets a gradient (everything else is behind its zero
    # weights), so take one step's worth of non-zero output weights first.
    _randomise_output(net)
    net(z, emb).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # conditioning reaches the output


def _shifts(ndim: int) -> tuple[int, ...]:
    return (2, -4, 6)[:ndim]  # even (stride-2 down-sampling), different per axis


def _shifted_outputs(ndim: int, periodic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For a net with a non-zero output layer, in float64: (the output of the input rolled by
    _shifts, the output rolled by _shifts)."""
    # float64 so that the only difference left, the summation order in GroupNorm's
    # statistics, is far below the periodic tolerance.
    net = _net(ndim, periodic=periodic).double()
    _randomise_output(net)
    z, emb = (t.double() for t in _inputs(ndim))
    dims = tuple(range(2, 2 + ndim))
    with torch.no_grad():
        out = net(z, emb)
        out_of_shifted = net(torch.roll(z, _shifts(ndim), dims), emb)
    assert out.abs().max() > 0.1
    return out_of_shifted, torch.roll(out, _shifts(ndim), dims)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_periodic_padding_is_equivariant_to_even_circular_shifts(ndim):
    out_of_shifted, shifted_out = _shifted_outputs(ndim, periodic=True)
    torch.testing.assert_close(out_of_shifted, shifted_out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_zero_padding_is_not_equivariant(ndim):
    out_of_shifted, shifted_out = _shifted_outputs(ndim, periodic=False)
    diff = out_of_shifted - shifted_out
    assert diff.abs().max() > 1e-2  # the edges are visible: far beyond the periodic tolerance


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_film_conditions_each_sample(ndim):
    # The FiLM scale/shift broadcast over every spatial dim must stay per sample: the same
    # input with two embeddings gives two outputs, and a batch equals its samples run alone.
    net = _net(ndim).double()  # float64: batched and single convolutions round differently
    _randomise_output(net)
    z, emb = (t.double() for t in _inputs(ndim))
    with torch.no_grad():
        batched = net(z, emb)
        alone = torch.cat([net(z[i:i + 1], emb[i:i + 1]) for i in range(len(z))])
        swapped = net(z[:1].expand(2, *z.shape[1:]), emb[:2])
    torch.testing.assert_close(batched, alone, atol=1e-10, rtol=1e-10)
    assert (swapped[0] - swapped[1]).abs().max() > 1e-3


@pytest.mark.parametrize("ndim,shape", [
    (1, (2, 2, 7)), (2, (2, 2, 8, 7)), (2, (2, 2, 7, 8)), (3, (2, 2, 4, 6, 5)), (3, (2, 2, 5, 6, 4)),
])
def test_periodic_odd_size_names_the_shape_and_the_way_out(ndim, shape):
    net = _net(ndim)
    pattern = rf"ndim={ndim}, levels=1.*circular.*multiple of 2 .*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern + r".*periodic=False"):
        net(torch.zeros(shape), torch.zeros(shape[0], 16))


@pytest.mark.parametrize("ndim,shape", [(1, (2, 2, 8, 8)), (2, (2, 2, 8)), (3, (2, 2, 8, 8))])
def test_wrong_rank_names_the_shape(ndim, shape):
    with pytest.raises(ValueError, match=rf"ndim={ndim}, levels=1\) needs input \[B, C.*got {tuple(shape)}"
                       .replace("(2", r"\(2").replace(", 8)", r", 8\)")):
        _net(ndim, periodic=False)(torch.zeros(shape), torch.zeros(shape[0], 16))


@pytest.mark.parametrize("ndim,spatial,levels", [
    (1, (7,), 1), (2, (7, 8), 1), (2, (8, 5), 2), (3, (5, 6, 4), 1), (3, (45, 16, 9), 2), (3, (3, 3, 3), 3),
])
def test_zero_padding_takes_any_size(ndim, spatial, levels):
    """With zero padding the UNet pads odd sizes up to a multiple of 2^levels at the far end of
    each axis and crops back: the output has the input's shape, equals the network on the input
    extended by zeros (cropped), and every output site feeds back to the weights."""
    torch.manual_seed(0)
    net = UNet(2, 4, 16, periodic=False, ndim=ndim, levels=levels)
    nn.init.normal_(net.out.weight, std=0.1)  # the zero-initialised output would hide a wrong crop
    z, emb = torch.randn(3, 2, *spatial, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    net = net.double()
    out = net(z, emb)
    assert out.shape == z.shape
    step = 2**levels
    big = torch.zeros(3, 2, *(-(-s // step) * step for s in spatial), dtype=torch.float64)
    big[(..., *(slice(0, s) for s in spatial))] = z
    torch.testing.assert_close(out, net(big, emb)[(..., *(slice(0, s) for s in spatial))])
    # The far corner of the box depends on its own input (the crop kept the right sites).
    z2 = z.clone()
    z2[(..., *(s - 1 for s in spatial))] += 1.0
    corner = (..., *(s - 1 for s in spatial))
    assert (net(z2, emb)[corner] - out[corner]).abs().max() > 1e-6
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("ndim", [0, 4, "2"])
def test_unsupported_ndim_is_rejected(ndim):
    with pytest.raises(ValueError, match=r"ndim must be one of \[1, 2, 3\]"):
        UNet(1, 8, 16, ndim=ndim)


# ------------------------------------------- the data's boundary (what will choose padding)
# Here rather than in a data test file because this change owns only this test module; the
# field exists for the UNet's periodic/zero padding choice.


def test_manifest_meta_without_boundary_loads_as_before():
    from pipeline.data.meta import DataMeta
    from pipeline.data.shards import meta_from_dict

    # A manifest's "meta" as written before the field existed (Ising preset).
    old = {"sample_shape": [1, 16, 16], "data_kind": "spins", "num_levels": None, "label_kind": "continuous",
           "num_classes": None, "label_values": [3.0]}
    meta = meta_from_dict(old)
    assert meta == DataMeta(sample_shape=(1, 16, 16), data_kind="spins", label_kind="continuous",
                            label_values=(3.0,))
    assert meta.boundary is None


@pytest.mark.parametrize("boundary", ["periodic", "open", None])
def test_boundary_round_trips_through_the_manifest_dict(boundary):
    import json

    from pipeline.data.meta import DataMeta
    from pipeline.data.shards import meta_from_dict, meta_to_dict

    meta = DataMeta(sample_shape=(1, 8, 8, 8), data_kind="continuous", boundary=boundary)
    d = json.loads(json.dumps(meta_to_dict(meta)))
    assert d["boundary"] == boundary and meta_from_dict(d) == meta


def test_unknown_boundary_names_the_key_and_the_choices():
    from pipeline.data.meta import DataMeta
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"boundary='circular'.*'periodic', 'open' or None"):
        DataMeta(sample_shape=(1, 8), data_kind="continuous", boundary="circular")


@pytest.mark.parametrize("shape, auto_arch", [((1, 16), "MLP"), ((2, 8, 8), "UNet"), ((1, 8, 8, 8), "UNet")])
def test_vdm_trains_and_samples_fields_in_1d_2d_3d(shape, auto_arch):
    """The VDM builds a UNet of the samples' dimensionality (a 1D one only by name: [C, L] may be
    a feature vector), back-propagates through it and samples the data's shape."""
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.base import StepContext
    from pipeline.objectives.vdm import VDM, VDMConfig

    meta = DataMeta(sample_shape=shape, data_kind="continuous")
    assert type(VDM(VDMConfig(num_timesteps=0), meta).denoiser.net).__name__ == auto_arch
    torch.manual_seed(0)
    m = VDM(VDMConfig(num_timesteps=0, architecture="unet", channels=8), meta)
    net = m.denoiser.net
    assert net.inp.weight.dim() == len(shape) + 1  # Conv{len(shape) - 1}d kernels
    out = m({"x": torch.randn(4, *shape)}, StepContext(0, 0, 1, 0, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in net.parameters())
    assert m.sample(3, num_steps=4).shape == (3, *shape)


def test_vdm_unet_refuses_odd_periodic_fields_naming_the_shape_and_takes_them_with_zero_padding():
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.vdm import VDM, VDMConfig

    meta = DataMeta(sample_shape=(1, 7, 8), data_kind="continuous")
    with pytest.raises(ValueError, match=r"periodic=true \(circular padding\) needs even spatial sizes; got "
                                         r"\(1, 7, 8\).*vdm.periodic=false"):
        VDM(VDMConfig(architecture="unet"), meta)
    with pytest.raises(ValueError, match=r"needs samples \[C, L\].*got \(1, 2, 2, 2, 2\)"):
        VDM(VDMConfig(architecture="unet", periodic=False), DataMeta(sample_shape=(1, 2, 2, 2, 2), data_kind="continuous"))
    m = VDM(VDMConfig(num_timesteps=0, architecture="unet", periodic=False, unet_levels=2, channels=4), meta)
    assert type(m.denoiser.net).__name__ == "UNet"
    assert m.sample(2, num_steps=3).shape == (2, 1, 7, 8)
    # auto never pads: odd sizes still get the MLP
    assert type(VDM(VDMConfig(periodic=False), meta).denoiser.net).__name__ == "MLP"
