"""``vdm.data_transform=log-label-fraction``: the map, its Jacobian, the ELBO of the stored values
by the change of variables, and samples mapped back to data space.

References are independent of the module's formulas: the Jacobian by autograd, the ELBO of a
transform-free VDM with the same weights on the transformed data, samples of that VDM mapped
back by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.eval.elbo import exact_elbo
from pipeline.objectives.base import StepContext
from pipeline.objectives.data_space import DataSpace
from pipeline.objectives.vdm import VDM, VDMConfig

FLOOR = 1e-6
CALO_PRESET = Path(__file__).parents[2] / "configs" / "vdm_calo.yaml"
META = DataMeta(sample_shape=(1, 2, 3), data_kind="continuous", label_kind="continuous",
                label_range=(1e3, 1e6))


def showers(n=5, seed=0):
    """Deposits >= 0 (a third exactly 0) and incident energies, log-uniform 1 GeV - 1 TeV in MeV."""
    g = torch.Generator().manual_seed(seed)
    e = 10 ** (3 + 3 * torch.rand(n, generator=g, dtype=torch.float64))
    frac = 10 ** (-7 + 5 * torch.rand(n, *META.sample_shape, generator=g, dtype=torch.float64))
    frac = frac * (torch.rand(frac.shape, generator=g, dtype=torch.float64) < 0.67)
    return frac * e.reshape(-1, 1, 1, 1), e


def test_map_endpoints_round_trip_and_jacobian_by_autograd():
    space = DataSpace(META, "log-label-fraction", FLOOR)
    x, e = showers()
    y = space.to_model(x, e)
    assert float(y.min()) == -1.0  # empty voxels
    assert bool((y < 1).all())
    one = space.to_model(e.reshape(-1, 1, 1, 1) * (1 - FLOOR) * torch.ones_like(x), e)
    torch.testing.assert_close(one, torch.ones_like(one))
    torch.testing.assert_close(space.to_data(y, e), x, rtol=1e-10, atol=1e-12)
    # The map is elementwise, so log |det| = sum of log dy/dx, each by autograd.
    xr = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(space.to_model(xr, e).sum(), xr)
    torch.testing.assert_close(space.log_abs_det(x, e), dy.log().flatten(1).sum(1))
    # Outside [-1, 1] the inverse clamps: a deposit is never negative nor above the incident energy.
    assert float(space.to_data(torch.full_like(y, -1.5), e).min()) == 0.0
    above = space.to_data(torch.full_like(y, 1.5), e)
    torch.testing.assert_close(above, e.reshape(-1, 1, 1, 1) * (1 - FLOOR) * torch.ones_like(above))


def test_refuses_negative_values_and_missing_or_non_positive_labels():
    space = DataSpace(META, "log-label-fraction", FLOOR)
    x, e = showers()
    with pytest.raises(ValueError, match="non-negative"):
        space.to_model(x - 1.0, e)
    with pytest.raises(ValueError, match="pass labels"):
        space.to_model(x, None)
    with pytest.raises(ValueError, match="positive labels"):
        space.to_model(x, -e)
    with pytest.raises(ValueError, match="continuous data"):
        DataSpace(DataMeta(sample_shape=(4,), data_kind="spins"), "log-label-fraction", FLOOR)


def test_config_checks_name_the_fix():
    cfg = VDMConfig(num_timesteps=0, data_transform="log-label-fraction")
    cfg.validate()
    cfg.check_data(META)
    with pytest.raises(ConfigError, match="continuous labels"):
        cfg.check_data(DataMeta(sample_shape=(1, 2, 3), data_kind="continuous"))
    with pytest.raises(ConfigError, match="positive labels"):
        cfg.check_data(DataMeta(sample_shape=(1, 2, 3), data_kind="continuous", label_kind="continuous",
                                label_values=(0.0, 1.0)))
    with pytest.raises(ConfigError, match="data_transform_floor"):
        VDMConfig(data_transform="log-label-fraction", data_transform_floor=0.5).validate()
    # Unknown names: the config parser's check of the Literal field (exit 2 from the CLI).
    with pytest.raises(ConfigError, match="not allowed; allowed: 'none', 'log-label-fraction'"):
        load_config(CALO_PRESET, ["vdm.data_transform=log"])
    with pytest.raises(ConfigError, match="not allowed; allowed: 'none', 'gaussian'"):
        load_config(CALO_PRESET, ["vdm.skip=yes"])


def pair() -> tuple[VDM, VDM]:
    """A VDM with the transform and one without, same weights."""
    torch.manual_seed(0)
    kw = dict(num_timesteps=0, architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8,
              gamma_min=-8.0, gamma_max=6.0)
    with_t = VDM(VDMConfig(data_transform="log-label-fraction", data_transform_floor=FLOOR, **kw), META)
    with torch.no_grad():
        with_t.denoiser.net.out.weight.normal_(0, 0.5)
        with_t.denoiser.net.out.bias.normal_(0, 0.3)
    plain = VDM(VDMConfig(**kw), META)
    plain.load_state_dict(with_t.state_dict())
    return with_t, plain


def test_elbo_of_stored_values_is_the_model_space_elbo_by_change_of_variables():
    with_t, plain = pair()
    x, e = (v.float() for v in showers(4))
    y = DataSpace(META, "log-label-fraction", FLOOR).to_model(x, e)
    xr = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(DataSpace(META, "log-label-fraction", FLOOR).to_model(xr, e).sum(), xr)
    log_det = dy.log().flatten(1).sum(1)
    kw = dict(num_noise_samples=4, num_quadrature_points=8)
    got = exact_elbo(with_t, x, e, generator=torch.Generator().manual_seed(3), **kw)
    ref = exact_elbo(plain, y, e, generator=torch.Generator().manual_seed(3), **kw)
    to_bpd = 1.0 / (6 * math.log(2))
    torch.testing.assert_close(got["per_sample_bpd"], ref["per_sample_bpd"] - log_det * to_bpd)
    assert got["diffusion_bpd"] == pytest.approx(ref["diffusion_bpd"], rel=1e-6)
    # The training estimate carries the same Jacobian, so train and evaluate agree on units.
    ctx = StepContext(step=0, micro_step=0, grad_accum_steps=1, rank=0, world_size=1)
    out_t = with_t({"x": x, "label": e}, ctx, noise_generator=torch.Generator().manual_seed(5),
                   time_generator=torch.Generator().manual_seed(6))
    out_p = plain({"x": y, "label": e}, ctx, noise_generator=torch.Generator().manual_seed(5),
                  time_generator=torch.Generator().manual_seed(6))
    assert float(out_t.loss_recon) == pytest.approx(float(out_p.loss_recon - log_det.mean() * to_bpd), rel=1e-5)
    assert float(out_t.loss_diff) == pytest.approx(float(out_p.loss_diff), rel=1e-6)


def test_samples_come_back_in_data_space():
    with_t, plain = pair()
    e = torch.tensor([2e3, 5e5])
    got = with_t.sample(2, labels=e, num_steps=4, generator=torch.Generator().manual_seed(7))
    y = plain.sample(2, labels=e, num_steps=4, generator=torch.Generator().manual_seed(7))
    ref = (torch.expm1((y.clamp(max=1) + 1) * 0.5 * math.log(1 / FLOOR)) * FLOOR * e.reshape(-1, 1, 1, 1)).clamp_min(0)
    torch.testing.assert_close(got, ref)
    assert bool((got >= 0).all())


def test_the_config_and_the_data_space_allow_the_same_transforms():
    """The config parser refuses names outside VDMConfig.data_transform's Literal (exit 2);
    DataSpace, built from Python, checks its own tuple: the two lists must agree."""
    import typing

    from pipeline.objectives import data_space

    allowed = typing.get_args(typing.get_type_hints(VDMConfig)["data_transform"])
    assert set(allowed) == set(data_space.TRANSFORMS)
