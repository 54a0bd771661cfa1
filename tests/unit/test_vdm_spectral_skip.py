"""``vdm.skip=spectral`` (objectives/vdm/denoiser.py::SpectralSkip): the Wiener filter with the
data's mean and power spectrum per channel. Checked against the exact GRF denoiser
(pipeline.eval.grf.ExactGRFDenoiser, an independent implementation of the same closed form),
its moments against the field they were estimated from, and its gathering over ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.meta import DataMeta
from pipeline.eval.grf import ExactGRFDenoiser
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm.denoiser import SpectralSkip
from pipeline.physics.grf import GRF, PowerLaw
from tests.unit.skips import train_skip_over_ranks

FIELD = GRF(ndim=2, size=8, channels=2, zero_mode_power=None, spectrum=PowerLaw(spectral_index=-2.0, amplitude=1.8))


def _vdm(meta: DataMeta) -> VDM:
    cfg = VDMConfig(num_timesteps=0, architecture="unet", channels=4, emb_dim=8, skip="spectral")
    return VDM(cfg, meta)


def test_with_the_exact_spectrum_it_is_the_exact_grf_denoiser():
    skip = SpectralSkip(FIELD.shape)
    with torch.no_grad():  # moments = the field's own: one "sample" whose power is P exactly
        skip.count.fill_(1.0)
        skip.power_sums.copy_(torch.from_numpy(FIELD.power_half()).expand_as(skip.power_sums))
    exact = ExactGRFDenoiser(FIELD).double()
    z = torch.randn(5, *FIELD.shape, dtype=torch.float64)
    for gamma in (-6.0, 0.0, 5.0):
        g = torch.full((5,), gamma, dtype=torch.float64)
        torch.testing.assert_close(skip(z, g), exact(z, g), rtol=1e-10, atol=1e-12)


def test_moments_estimate_the_field_mean_and_spectrum_and_gather_over_ranks():
    rng = np.random.default_rng(0)
    offset = torch.tensor([0.7, -1.5], dtype=torch.float64).reshape(2, 1, 1)
    x = torch.from_numpy(FIELD.sample(4096, rng)) + offset  # a mean per channel, the same spectrum
    meta = DataMeta(sample_shape=FIELD.shape, data_kind="continuous", boundary="periodic")
    mu0, p0 = _vdm(meta).denoiser.skip.moments()  # before any data: unit white noise
    assert mu0.abs().max() == 0 and bool((p0 == 1).all())
    batches = [x[i:i + 512].float() for i in range(0, 4096, 512)]
    one = train_skip_over_ranks(_vdm(meta), [[b] for b in batches])
    two = train_skip_over_ranks(_vdm(meta), [[b[:200], b[200:]] for b in batches])
    for m in (one, two):
        mu, power = m.denoiser.skip.moments()
        # The mean per channel, within 5 standard errors of a field mean (Var = P(0) / N per sample).
        se_mean = math.sqrt(float(FIELD.power_half().ravel()[0]) / 64 / 4096)
        assert float((mu - offset.flatten()).abs().max()) < 5 * se_mean, mu
        # P(k) per mode: |x_hat|^2 / N is P times a chi-square with 2 (1 for real modes) degrees of
        # freedom over 2, so each estimate is within 5 x sqrt(2 / n) of P; P(0) has the mean removed.
        rel = (power / torch.from_numpy(FIELD.power_half()) - 1).abs()
        assert float(rel.max()) < 5 * math.sqrt(2 / 4096), float(rel.max())
    torch.testing.assert_close(one.denoiser.skip.moments()[1], two.denoiser.skip.moments()[1])


def test_the_untrained_vdm_denoises_with_the_skip_alone():
    meta = DataMeta(sample_shape=FIELD.shape, data_kind="continuous", boundary="periodic")
    m = train_skip_over_ranks(_vdm(meta), [[torch.from_numpy(FIELD.sample(64, np.random.default_rng(1))).float()]])
    z = torch.randn(3, *FIELD.shape)
    with torch.no_grad():
        torch.testing.assert_close(m.denoiser(z, torch.tensor(1.0)), m.denoiser.skip(z, torch.tensor(1.0)))
        assert float(m.denoiser.skip(z, torch.tensor(1.0)).abs().max()) > 0


@pytest.mark.parametrize("meta", [DataMeta(sample_shape=(1, 8, 8), data_kind="continuous", boundary="open"),
                                  DataMeta(sample_shape=(1, 8, 8), data_kind="continuous")])
def test_data_without_a_periodic_boundary_is_refused_naming_the_fix(meta):
    with pytest.raises(ConfigError, match=r"vdm.skip=spectral is the denoiser of a stationary field on a periodic "
                                          r"grid.*boundary (open|None); use vdm.skip=gaussian"):
        _vdm(meta)
