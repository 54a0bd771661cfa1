"""Evaluation against a Gaussian random field, whose density and spectrum are known exactly.

For a run trained on ``pipeline shards grf`` data (the field is rebuilt from the manifest's
``info`` with ``grf_from_info``; conventions in ``pipeline/physics/grf.py``):

 - the power spectrum of generated fields against the exact P(k) per shell |m| = b: the
   ratio of the mean estimate to P, its standard error across samples and the one the
   exact field implies, a chi-square over shells and the worst shell (``compare_spectrum``);
   the same for as many reference fields, the noise level to compare with;
 - the one-point distribution of all sites against the exact N(0, C(0)): W1 and the KS
   distance (``one_point``), again with the reference's values next to them;
 - for 2D fields, the Minkowski functionals of the excursion sets (area fraction, boundary
   length and Euler characteristic per unit area at thresholds nu sigma0,
   ``pipeline/physics/minkowski.py``) against their exact expectation for this field on
   this lattice, next to the continuum curves (Tomita 1986) and the reference fields' values;
 - for VDMs, the negative ELBO of held-out fields (the exact evaluator, ``_vdm_likelihood``)
   next to their exact negative log-likelihood (``GRF.log_density``), in nats and bits per
   dimension. The ELBO is a bound: -ELBO >= -log p for any model, in expectation over the
   data, so an ELBO more than ``ELBO_BOUND_Z`` = 3 standard errors below the exact NLL is
   flagged as a bug (of the evaluator, the data or the field's record), not a finding
   about the model;
 - for continuous-time VDMs, the floor of the negative ELBO that the run's schedule
   endpoints allow: the exact denoiser of the field (``ExactGRFDenoiser``) still pays the
   prior and reconstruction terms at gamma_max and gamma_min (``elbo_gap_nats``).

The closed forms below are derived in a real orthonormal Fourier basis, in which the
field's covariance is diag(P(k)) over the N full-grid modes (module docstring of
``pipeline/physics/grf.py``: the unitary DFT F / sqrt(N) diagonalises C with eigenvalues
P(k)) and white noise stays white: every mode is an independent scalar problem.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline.physics import minkowski
from pipeline.physics.grf import GRF, compare_spectrum, grf_from_info, one_point

# An ELBO this many standard errors below the exact NLL is flagged (issue 17). Tighter than
# the evaluator's usual 5 sigma for findings: below the bound is a bug, not a finding.
ELBO_BOUND_Z = 3.0


# ----------------------------------------------------------------------- exact denoiser


class ExactGRFDenoiser(nn.Module):
    """The optimal eps-prediction for data drawn from ``field``, with the interface of
    ``pipeline.objectives.vdm.Denoiser``: forward(z, gamma, label) -> eps_hat.

    At -log SNR gamma, z = alpha x + sigma eps with alpha^2 = sigmoid(-gamma), sigma^2 =
    sigmoid(gamma). Per orthonormal Fourier mode x has variance P and eps variance 1, so
    E[eps | z] = Cov(eps, z) / Var(z) z = sigma z / (alpha^2 P + sigma^2): a linear filter,
    diagonal in Fourier space, applied with the unnormalised rfftn / irfftn pair (the 1/N
    of irfftn undoes the N of rfftn, so the per-mode gain is applied as it is)."""

    def __init__(self, field: GRF):
        super().__init__()
        self.field = field
        self.register_buffer("power_half", torch.from_numpy(field.power_half()), persistent=False)
        # exact_elbo and VDM.sample read the device from the parameters; this one does nothing.
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        assert label is None, "a GRF has no labels"
        nd = self.field.ndim
        assert tuple(z.shape[1:]) == self.field.shape, (tuple(z.shape), self.field.shape)
        g = gamma.double().expand(z.shape[0]) if gamma.dim() == 0 else gamma.double()
        g = g.reshape(-1, *(1,) * (z.dim() - 1))
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        axes = tuple(range(-nd, 0))
        z_hat = torch.fft.rfftn(z.double(), dim=axes)
        eps_hat = torch.fft.irfftn(z_hat * (s2.sqrt() / (a2 * self.power_half + s2)), s=(self.field.size,) * nd,
                                   dim=axes)
        return eps_hat.to(z.dtype) + 0 * self.dummy


def elbo_gap_nats(power: np.ndarray, gamma_min: float, gamma_max: float) -> dict[str, float]:
    """E_x[-ELBO(x)] of a continuous-time VDM with the exact denoiser (any schedule with these
    endpoints, Kingma et al. 2021 eq. 17 and sec. 5.1), term by term, and the exact NLL
    E_x[-log p(x)], in nats per field, for a Gaussian field with mode variances ``power``
    (the P(k) of every full-grid mode, summed over channels by the caller).

    Per mode of variance P, with a_t^2 = sigmoid(-g), s_t^2 = sigmoid(g):
      recon  = E -log N(x; z_0 / a_0, s_0^2 / a_0^2) = 1/2 (1 + log 2 pi + g_0)  (x - z_0/a_0 = -s_0 eps / a_0)
      prior  = E KL(N(a_1 x, s_1^2) || N(0, 1)) = 1/2 (s_1^2 + a_1^2 P - 1 - log s_1^2)
      diff   = 1/2 int_{g_0}^{g_1} Var(eps | z_g) dg, Var(eps | z) = 1 - s^2 / (a^2 P + s^2) = P / (P + e^g),
             = 1/2 [log(e^g / (P + e^g))]_{g_0}^{g_1}  (substitute u = e^g)
      nll    = 1/2 log(2 pi e P).
    The gap -> 0 as g_0 -> -inf, g_1 -> +inf: then recon + diff -> 1/2 log(2 pi e P)."""
    p = np.asarray(power, dtype=np.float64).ravel()
    assert np.all(p > 0) and gamma_min < gamma_max
    g0, g1 = float(gamma_min), float(gamma_max)
    a1_sq, s1_sq = 1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))
    log_s1_sq = -math.log1p(math.exp(-g1))
    recon = 0.5 * (1 + math.log(2 * math.pi) + g0) * p.size
    prior = float((0.5 * (s1_sq + a1_sq * p - 1 - log_s1_sq)).sum())
    # log(e^g / (P + e^g)) = -log1p(P e^{-g}), stable at both ends.
    diff = float((0.5 * (-np.log1p(p * math.exp(-g1)) + np.log1p(p * math.exp(-g0)))).sum())
    nll = float((0.5 * np.log(2 * math.pi * math.e * p)).sum())
    total = recon + prior + diff
    return {"recon": recon, "prior": prior, "diffusion": diff, "neg_elbo": total, "nll": nll, "gap": total - nll}


def field_power(field: GRF) -> np.ndarray:
    """Mode variances of all C x N values of a sample: P(k) on the full grid, per channel."""
    return np.tile(field.power_full().ravel(), field.channels)


# ------------------------------------------------------------------ arrays -> figures


def evaluate_grf(samples: np.ndarray, field: GRF, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Power spectrum and one-point distribution of ``samples`` [S, C, L, ...] against the exact
    field, and the same figures for ``reference`` fields (true draws: the noise level)."""
    cmp = compare_spectrum(samples, field)
    out: dict[str, Any] = {
        "num_generated": len(samples),
        "power_spectrum_max_rel_err": cmp.worst_relative_error,
        "power_spectrum_worst_k": float(cmp.k[cmp.worst_bin]),
        "power_spectrum_chi2": cmp.chi2,
        "power_spectrum_num_bins": cmp.num_bins,
        "power_spectrum_chi2_per_bin": cmp.chi2 / cmp.num_bins,
        "power_spectrum": {"k": cmp.k, "num_modes": cmp.num_modes, "exact": cmp.exact, "ratio": cmp.ratio,
                           "stderr": cmp.stderr, "stderr_exact": cmp.stderr_exact},
    }
    op = one_point(samples, field)
    out.update(w1_one_point=op["w1"], ks_one_point=op["ks"], std_one_point=op["std"], std_exact=op["exact_std"])
    if field.ndim == 2:
        out.update(minkowski_figures(samples, field, reference))
    if reference is not None:
        ref = compare_spectrum(reference, field)
        rop = one_point(reference, field)
        out.update(num_reference=len(reference), power_spectrum_max_rel_err_reference=ref.worst_relative_error,
                   power_spectrum_chi2_reference=ref.chi2, w1_one_point_reference=rop["w1"],
                   ks_one_point_reference=rop["ks"])
    return out


def minkowski_figures(samples: np.ndarray, field: GRF, reference: np.ndarray | None = None,
                      nu: tuple[float, ...] = minkowski.DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """Minkowski functionals of 2D ``samples`` [S, C, L, L] (each channel one map) at thresholds
    nu sqrt(C(0)) against the field's exact lattice expectation: sums of z^2 and max |z| per
    functional (``minkowski_*``), the same for ``reference`` fields (``minkowski_*_reference``,
    the noise level), and the curves (``minkowski``: mean, stderr, exact, continuum, reference)."""
    assert field.ndim == 2, field.ndim
    cov = minkowski.LatticeCovariance.from_correlation(field.correlation())
    nu_arr = np.asarray(nu, dtype=np.float64)
    exact = minkowski.gaussian_lattice_expectation(cov, nu_arr)
    sigma0 = math.sqrt(cov.c0)
    cmp = minkowski.compare_minkowski(samples, sigma0, nu_arr, exact)
    out: dict[str, Any] = cmp.metrics("minkowski")
    curves = {"nu": nu_arr, "names": list(minkowski.NAMES), "mean": cmp.mean, "stderr": cmp.stderr,
              "exact": exact, "continuum": minkowski.gaussian_continuum_expectation(cov.c0, cov.sigma1_sq, nu_arr)}
    if reference is not None:
        ref = minkowski.compare_minkowski(reference, sigma0, nu_arr, exact)
        out.update(ref.metrics("minkowski_reference"))
        curves.update(reference_mean=ref.mean, reference_stderr=ref.stderr)
    out["minkowski"] = curves
    return out


def compare_with_exact_nll(lik: dict[str, Any], held_x: np.ndarray, field: GRF,
                           z_max: float = ELBO_BOUND_Z) -> tuple[dict, list[str]]:
    """The exact NLL of the held-out fields ``held_x`` (those the ELBO ``lik`` was evaluated
    on) next to it, in nats and bits per dimension; flags an ELBO below the exact NLL."""
    num_dims = field.channels * field.num_sites
    nll = -field.log_density(held_x) / num_dims  # [S] nats per dim
    nll_mean, nll_se = float(nll.mean()), float(nll.std(ddof=1) / math.sqrt(len(nll)))
    nats, nats_se = lik["bits_per_dim"] * math.log(2), lik["bits_per_dim_stderr"] * math.log(2)
    gap = nats - nll_mean
    # The two means are over the same fields and positively correlated, so the combined
    # error of their difference is an upper bound: the flag errs towards not firing.
    gap_se = math.hypot(nats_se, nll_se)
    out = {"nats_per_dim": nats, "nats_per_dim_stderr": nats_se, "nll_exact_nats_per_dim": nll_mean,
           "nll_exact_nats_per_dim_stderr": nll_se, "nll_exact_bits_per_dim": nll_mean / math.log(2),
           "gap_nats_per_dim": gap, "gap_nats_per_dim_stderr": gap_se, "elbo_over_exact_nll": nats / nll_mean}
    flags = []
    if gap < -z_max * gap_se:
        flags.append(f"negative ELBO {nats:.5f} nats/dim is {-gap / gap_se:.1f} sigma below the exact NLL "
                     f"{nll_mean:.5f} of the same fields: impossible for any model, so the likelihood evaluation, "
                     f"the data or the field's record is wrong")
    return out, flags


# --------------------------------------------------------------------------- a run


def evaluate_grf_run(module, meta, info, urls, reference, opts) -> dict[str, Any]:
    """``pipeline evaluate`` on a run trained on ``pipeline shards grf`` data."""
    from pipeline.eval.common import _held_out, _is_vdm, _vdm_likelihood, generate

    field = grf_from_info(reference.manifest["info"]["grf"])
    if meta.label_kind != "none":
        raise ValueError(f"a GRF has no labels but the run is conditional (label_kind {meta.label_kind!r})")
    notes = ["the field's density is continuous and in data units: nats/bits per dimension are a differential "
             "(negative) log-density, comparable only with densities of the same data in the same units"]
    t0 = time.perf_counter()
    x = generate(module, opts.num_samples, None, seed=opts.seed, num_steps=opts.num_steps,
                 sampler=opts.sampler, batch_size=opts.sample_batch_size)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    result: dict[str, Any] = {"evaluation": "grf", "field": field.info()}
    result.update(evaluate_grf(x, field, reference=reference.x[: opts.num_samples]))
    notes.append("power_spectrum: shells round(|m|) = b; ratio = mean estimate / exact P with its standard error "
                 "(stderr across samples, stderr_exact as the exact field implies); chi2 over shells uses "
                 "stderr_exact; *_reference: as many true fields, the noise level to compare with")
    t_spec = time.perf_counter() - t0
    t0 = time.perf_counter()
    flags: list[str] = []
    lik = _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=False)
    if lik:
        held = _held_out(urls, reference, [])
        exact, flags = compare_with_exact_nll(lik, held.x[: lik["elbo_num_samples"]], field)
        lik.update(exact)
        if _is_vdm(module) and module.continuous:
            g0, g1 = (float(g) for g in module.endpoints("cpu"))
            floor = elbo_gap_nats(field_power(field), g0, g1)
            num_dims = field.channels * field.num_sites
            lik["elbo_floor_gap_nats_per_dim"] = floor["gap"] / num_dims
            notes.append(f"elbo_floor_gap_nats_per_dim: what the exact denoiser would still add to the exact NLL "
                         f"with this run's schedule endpoints gamma in [{g0:.3g}, {g1:.3g}] (prior and "
                         f"reconstruction terms; closed form, expectation over the field)")
    result.update(lik)
    result["flags"] = flags
    result["notes"] = notes
    result["timings_s"] = {"sample_s": t_sample, "spectrum_s": t_spec, "elbo_s": time.perf_counter() - t0}
    return result
