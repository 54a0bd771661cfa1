"""The headline figures of ``pipeline bench variance`` from its per-sampler statistics:
total variances (data part + the sampler's part, law of total variance), ratios against the
uniform sampler, the best sampler, its bias, and the same tables per estimator form."""

from __future__ import annotations

from typing import Any

# ``stats`` maps form -> sampler -> pipeline.bench.variance.SamplerStats (not imported: that
# module imports this one).


def summarise(stats: dict[str, dict[str, Any]], head: str, d_var: float, grads: bool,
              floor: float, exact_baseline: tuple[str, float]) -> dict[str, Any]:
    """The headline figures of form ``head`` (variances, ratios vs uniform, bias, best sampler),
    the per-form tables, and where the denoising-matching form's variance comes from: ``floor``
    is :func:`pipeline.bench.variance_batches.noise_floor`; ``exact_baseline`` the name and
    variance given x of the uniform baseline computed, not measured
    (:func:`pipeline.bench.variance_batches.uniform_variance`)."""
    hs = stats[head]

    def per(f: str, key: str) -> dict[str, float]:
        return {s: getattr(st, key) for s, st in stats[f].items()}

    def total(f: str) -> dict[str, float]:
        return {s: d_var + st.variance_given_x for s, st in stats[f].items()}

    def ratio(v: dict[str, float]) -> dict[str, float]:
        return {s: v["uniform"] / x if x > 0 else float("inf") for s, x in v.items()}

    var = total(head)
    best = min(var, key=var.get)
    return {
        "data_variance": d_var,
        "variance": var,
        "variance_given_x": per(head, "variance_given_x"),
        "variance_t_only": per(head, "variance_t_only"),
        "ratio_vs_uniform_by_sampler": ratio(var),
        "ratio_vs_uniform_given_x_by_sampler": ratio(per(head, "variance_given_x")),
        "ratio_vs_uniform_t_only_by_sampler": ratio(per(head, "variance_t_only")),
        "mean_bpd": per(head, "mean_bpd"),
        "bias_bpd": per(head, "bias_bpd"),
        "bias_sigma_by_sampler": per(head, "bias_sigma"),
        "grad_variance": per(head, "grad_variance"),
        "grad_norm_variance": per(head, "grad_norm_variance"),
        "grad_norm_mean": per(head, "grad_norm_mean"),
        "best_sampler": best,
        "ratio_vs_uniform": ratio(var)[best],
        "ratio_vs_uniform_given_x": ratio(per(head, "variance_given_x"))[best],
        "ratio_vs_uniform_t_only": ratio(per(head, "variance_t_only"))[best],
        "grad_variance_ratio_vs_uniform": hs["uniform"].grad_variance / hs[best].grad_variance if grads else None,
        "bias_sigma": hs[best].bias_sigma,
        "variance_by_form": {f: total(f) for f in stats},
        "variance_given_x_by_form": {f: per(f, "variance_given_x") for f in stats},
        "variance_t_only_by_form": {f: per(f, "variance_t_only") for f in stats},
        "bias_sigma_by_form": {f: per(f, "bias_sigma") for f in stats},
        **_decomposition({s: st.variance_given_x for s, st in stats["denoising_matching"].items()}, d_var, floor),
        **_exact_baseline(exact_baseline, var, best, d_var, floor),
    }


def _exact_baseline(baseline: tuple[str, float], var: dict[str, float], best: str, d_var: float,
                    floor: float) -> dict[str, Any]:
    """The best sampler's ratio and the ceiling over the computed baseline, and the measured
    baseline over the computed one (~1: a check of both; the measured one is heavy-tailed)."""
    name, given_x = baseline
    total = d_var + given_x
    return {
        "exact_baseline": name,
        "exact_baseline_variance": total,
        "exact_baseline_measured_over_exact": var[name] / total if name in var else None,
        "ratio_vs_exact_baseline": total / var[best],
        "ratio_ceiling_vs_exact_baseline": total / (d_var + floor),
    }


def _decomposition(given_x: dict[str, float], d_var: float, floor: float) -> dict[str, Any]:
    """Each sampler's total variance (denoising-matching form) as data + noise floor (what no
    time-step sampler removes at this cost) + the rest (what a better choice of t could still
    remove, at most), and the best ratio vs uniform that any time-step sampler could reach:
    uniform's total over data + floor (and over uniform-linear's, a learned schedule's baseline,
    when it was measured)."""
    base = {}
    if "uniform-linear" in given_x:  # a learned schedule's baseline (continuous time)
        linear = d_var + given_x["uniform-linear"]
        base = {"ratio_vs_uniform_linear_by_sampler": {s: linear / (d_var + v) for s, v in given_x.items()},
                "ratio_ceiling_vs_uniform_linear": linear / (d_var + floor)}
    return {
        **base,
        "noise_floor": floor,
        "ratio_ceiling_any_t_sampler": (d_var + given_x["uniform"]) / (d_var + floor),
        "variance_decomposition": {s: {"total": d_var + v, "data": d_var, "noise_floor": floor, "removable": v - floor}
                                   for s, v in given_x.items()},
    }
