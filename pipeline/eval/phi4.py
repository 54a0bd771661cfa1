"""``pipeline evaluate`` on lattice phi^4 runs: magnetisation, susceptibility and two-point
function of generated configurations against the reference, and the likelihood against the
exact free-field entropy.

The reference is exact at lam = 0 (the free field, ``pipeline.physics.phi4``): <|M|>, chi,
G(k); at lam > 0 it is the HMC ensemble the shards hold, whose configurations are
independent up to the thinning by 2 tau_int (the manifest records tau_int). Standard errors
of the generated side are over the (independent) samples; of the reference side over its
configurations, inflated by sqrt(2 tau_int / thin) where that exceeds 1.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from pipeline.physics import minkowski, phi4

Z_FLAG = 3.0  # |z| beyond which an observable is flagged (issue 17: within 3 standard errors)


def _per_config(phi: np.ndarray) -> dict[str, np.ndarray]:
    """Per-configuration estimators whose ensemble means are the observables: |M|, V M^2
    (chi when <M> = 0, as the Z2 symmetry makes it) and |phi_hat(k)|^2 / V (G(k))."""
    phi = np.asarray(phi, dtype=np.float64).reshape(len(phi), *np.shape(phi)[-2:])
    m = phi4.magnetisation(phi)
    v = phi[0].size
    return {"abs_magnetisation": np.abs(m), "susceptibility": v * m * m,
            "propagator_k": np.abs(np.fft.fft2(phi)) ** 2 / v}


def _inflation(tau_int: float | None, thin: int | None) -> float:
    """Standard errors of the reference ensemble grow by sqrt(2 tau_int / thin) where its
    configurations, thinned by ``thin`` trajectories, are still correlated."""
    return math.sqrt(max(1.0, 2 * tau_int / thin)) if tau_int and thin else 1.0


def _mean_se(values: np.ndarray, inflation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values)) * inflation


def compare_phi4(samples: np.ndarray, reference: np.ndarray, theory: phi4.Phi4, *, tau_int: float | None = None,
                 thin: int | None = None) -> dict[str, Any]:
    """Observables of ``samples`` vs the exact free field (lam = 0) or the ``reference``
    ensemble: value, standard error and z for |M| and chi, and for G(k) the worst momentum."""
    gen, ref = _per_config(samples), _per_config(reference)
    inflation = _inflation(tau_int, thin)
    exact = None
    if theory.lam == 0:
        exact = {"abs_magnetisation": phi4.free_abs_magnetisation(theory.size, theory.kappa),
                 "susceptibility": phi4.free_susceptibility(theory.kappa),
                 "propagator_k": phi4.free_propagator_k(theory.size, theory.kappa)}
    out: dict[str, Any] = {"num_generated": len(samples), "num_reference": len(reference),
                           "reference_kind": "exact free field" if exact else "HMC ensemble"}
    for name in ("abs_magnetisation", "susceptibility", "propagator_k"):
        g, g_se = _mean_se(gen[name])
        r, r_se = _mean_se(ref[name], inflation)
        target, target_se = (exact[name], 0.0) if exact else (r, r_se)
        z = (g - target) / np.sqrt(g_se**2 + np.asarray(target_se) ** 2)
        if name == "propagator_k":
            worst = np.unravel_index(int(np.argmax(np.abs(z))), z.shape)
            out.update(propagator_max_abs_z=float(np.abs(z).max()),
                       propagator_max_rel_err=float(np.abs(g / target - 1).max()),
                       propagator_worst_k=[int(worst[0]), int(worst[1])])
            continue
        out.update({name: float(g), f"{name}_stderr": float(g_se), f"{name}_reference": float(target),
                    f"{name}_reference_stderr": float(target_se), f"{name}_z": float(z)})
        out[f"{name}_reference_ensemble"] = float(r)  # the HMC ensemble's own value, also at lam = 0
    return out


def compare_minkowski_phi4(samples: np.ndarray, reference: np.ndarray, inflation: float = 1.0,
                           nu: tuple[float, ...] = minkowski.DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """The three Minkowski functionals (area, boundary length, Euler characteristic per unit
    area; :mod:`pipeline.physics.minkowski`) of the generated configurations' excursion sets
    against the reference ensemble's (issue 17: for 2D maps, vs the reference data's), at
    thresholds nu * sigma0 with sigma0 = sqrt(<phi^2>) of the reference. z per threshold and
    functional with both sides' standard errors (the reference's inflated by its
    autocorrelation as for |M|); the sum of z^2 is a distance (thresholds are correlated),
    the largest |z| the headline."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), *np.shape(reference)[-2:])
    gen = np.asarray(samples, dtype=np.float64).reshape(len(samples), *np.shape(samples)[-2:])
    thresholds = np.asarray(nu, dtype=np.float64) * math.sqrt(float((ref**2).mean()))
    g, g_se = _mean_se(minkowski.minkowski_maps(gen, thresholds))
    r, r_se = _mean_se(minkowski.minkowski_maps(ref, thresholds), inflation)
    se = np.sqrt(g_se**2 + r_se**2)
    z = (g - r) / np.where(se > 0, se, np.inf)  # a threshold no map crosses on either side: z = 0
    out: dict[str, Any] = {"minkowski_max_abs_z": float(np.abs(z).max()), "minkowski_chi2": float((z**2).sum())}
    for i, name in enumerate(minkowski.NAMES):
        out[f"minkowski_{name}_max_abs_z"] = float(np.abs(z[i]).max())
        out[f"minkowski_{name}_chi2"] = float((z[i] ** 2).sum())
    out["minkowski"] = {"nu": list(nu), "names": list(minkowski.NAMES), "mean": g.tolist(), "stderr": g_se.tolist(),
                        "reference_mean": r.tolist(), "reference_stderr": r_se.tolist()}
    return out


def evaluate_phi4_run(module, meta, info, urls, reference, opts) -> dict[str, Any]:
    """``pipeline evaluate`` on a run trained on ``pipeline shards phi4`` data."""
    from pipeline.eval.common import _held_out, _vdm_likelihood, generate

    if meta.label_kind != "none":
        raise ValueError(f"phi4 data has no labels but the run is conditional (label_kind {meta.label_kind!r})")
    rec = reference.manifest["info"]
    theory = phi4.Phi4(**rec["phi4"])
    t0 = time.perf_counter()
    x = generate(module, opts.num_samples, None, seed=opts.seed, num_steps=opts.num_steps,
                 sampler=opts.sampler, batch_size=opts.sample_batch_size)
    t_sample = time.perf_counter() - t0
    result: dict[str, Any] = {"evaluation": "phi4", "phi4": rec["phi4"]}
    tau_int, thin = rec["hmc"]["tau_int_abs_m"], rec["hmc"]["thin"]
    result.update(compare_phi4(x, reference.x, theory, tau_int=tau_int, thin=thin))
    result.update(compare_minkowski_phi4(x, reference.x, _inflation(tau_int, thin)))
    notes = ["susceptibility = V <M^2> (<M> = 0 by symmetry); propagator_k = <|phi_hat(k)|^2> / V per momentum",
             "minkowski: functionals of the excursion sets {phi > nu sigma0} (sigma0^2 = the reference's <phi^2>) vs "
             "the reference ensemble's; z with both standard errors"]
    flags = [f"{name} {result[name]:.4g} is {result[name + '_z']:+.1f} standard errors from the reference "
             f"{result[name + '_reference']:.4g}" for name in ("abs_magnetisation", "susceptibility")
             if abs(result[name + "_z"]) > Z_FLAG]
    lik = _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=False)
    if lik and theory.lam == 0:
        held = _held_out(urls, reference, [])
        nll = theory.action(held.x[: lik["elbo_num_samples"], 0].astype(np.float64)) / theory.num_sites
        log_z = 0.5 * math.log(2 * math.pi) - 0.5 * float(np.log(1 / phi4.free_propagator_k(theory.size, theory.kappa)).mean())
        nll = nll + log_z  # -log p = S + log Z per site
        lik.update(nats_per_dim=lik["bits_per_dim"] * math.log(2), nll_exact_nats_per_dim=float(nll.mean()),
                   nll_exact_nats_per_dim_stderr=float(nll.std(ddof=1) / math.sqrt(len(nll))),
                   entropy_exact_nats_per_dim=phi4.free_nll_nats_per_dim(theory.size, theory.kappa))
    result.update(lik)
    result["flags"] = flags
    result["notes"] = notes
    result["timings_s"] = {"sample_s": t_sample}
    return result
