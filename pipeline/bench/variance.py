"""``pipeline bench variance``: how much the VDM's time-step samplers cut the variance of the
per-batch ELBO estimate, at equal cost, and whether they stay unbiased.

For a trained model (a run directory with ``export/``) and held-out data (the run's
``data.train_urls``, validation split when there is one), every sampler (uniform,
stratified, importance, importance-cv; in continuous time learned-schedule for a model that
has a learned time map, and uniform-linear, uniform t on the linear schedule between the
model's endpoints, the baseline of a learned or cosine schedule) and, in discrete time, both
estimator forms (denoising matching, Luo 2022 eq. 58; consistency, Luo eq. 45) estimate the negative ELBO of the same data batches.
Every estimate is one call of the training forward pass: B samples, one network evaluation
each, so all estimates have the same cost.

Design (common random numbers: every sampler sees the same batches and the same ctx.step
sequence). ``num_batches`` batches x_m of ``batch_size`` samples are drawn without
replacement from the held-out pool; each gets its exact negative ELBO
(:func:`pipeline.eval.elbo.exact_elbo`: every diffusion term evaluated, with its own
Monte-Carlo standard error). Then, per sampler, ``num_repeats`` estimates per batch, each
with a fresh ``ctx.step`` (a fresh stratified permutation), and:

* ``variance_given_x`` = E_x Var(estimate | batch): t and the noise eps redrawn. This is
  the part a sampler can change.
* ``variance_t_only`` = E_{x,eps} Var(estimate | batch, eps): only the time steps redrawn
  (eps held fixed per batch), the part due to t alone.
* ``data_variance`` = Var_x(E[estimate | x]) = Var(-ELBO(x)) / B, from the exact per-sample
  values minus their Monte-Carlo noise. Identical for every unbiased sampler.
* ``noise_floor``: the least E_x Var(estimate | batch) any time-step sampler can reach at
  this cost (:func:`~pipeline.bench.variance_batches.noise_floor`); with the data variance
  it bounds every ratio (``ratio_ceiling_any_t_sampler``), and ``--plot`` draws each
  sampler's variance as data + floor + what t could still remove.
* ``variance`` = data_variance + variance_given_x: the variance of one per-batch estimate
  with fresh data, noise and time steps (law of total variance), what training sees.

Ratios are uniform's variance over the sampler's. Uniform's measured variance is heavy-tailed
(a few terms carry most of its second moment), so the bench also computes it from the exact
evaluator's per-term means and noise variances (``exact_baseline_variance``; in continuous
time uniform gamma between the endpoints, ``exact_baseline`` names which sampler that is) and
reports the best sampler's ratio over it (``ratio_vs_exact_baseline``), the ceiling over it,
and the measured baseline over the computed one (``exact_baseline_measured_over_exact``, ~1).
The bias is the mean of all estimates minus the exact value on the same batches, in units of
the standard error of that difference (estimates' SE given the batches, combined with the
exact evaluator's SE).
Gradients (w.r.t. the denoiser's parameters) of every t-and-eps estimate give
``grad_variance`` = E_x tr Cov(g | batch) and the variance of the gradient norm.

The importance sampler's loss history is warmed up first on separate batches until every
bin holds a full history (as in training, where it is filled by earlier steps), then keeps
being updated after every estimate, as in training. Its proposal p_t is fixed before each
draw, so the estimate stays unbiased. The learned-schedule sampler uses the time map the
run learned. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.variance_batches import (EvalBatch, data_variance, exact_batches, load_pool, noise_floor,
                                             uniform_variance)
from pipeline.bench.variance_batches import keyed_generator
from pipeline.bench.variance_summary import summarise
from pipeline.errors import ConfigError
from pipeline.objectives.base import StepContext
from pipeline.objectives.vdm import VDM, VDMConfig

SAMPLERS = ("uniform", "stratified", "importance", "importance-cv", "learned-schedule", "uniform-linear")
CONTINUOUS_ONLY = ("learned-schedule", "uniform-linear")
SKIP_REASONS = {
    "learned-schedule": "the run has no learned time map (train with vdm.timestep_sampler=learned-schedule)",
    "uniform-linear": "the run's schedule is linear: 'uniform' is that baseline already",
}
FORMS = ("denoising_matching", "consistency")
MEASURE_STEP0 = 1_000_000  # ctx.step of the first measured estimate (warm-up uses 0, 1, ...)


@dataclass
class SamplerStats:
    mean_bpd: float  # mean of all estimates
    variance_given_x: float  # E_x Var(estimate | batch), t and eps redrawn, (bits/dim)^2
    variance_t_only: float  # E_{x,eps} Var(estimate | batch, eps), t redrawn
    grad_variance: float  # E_x tr Cov(gradient | batch)
    grad_norm_variance: float  # E_x Var(||gradient|| | batch)
    grad_norm_mean: float
    bias_bpd: float  # mean_bpd - exact value on the same batches
    bias_sigma: float  # bias / its standard error
    num_estimates: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def with_sampler(module: VDM, sampler: str, form: str | None = None) -> VDM | None:
    """A copy of ``module`` (same network and schedule weights) that draws time steps with
    ``sampler`` and uses the diffusion ``form``, with fresh sampler state; None when
    ``module`` has nothing to run it with (learned-schedule without a learned time map,
    uniform-linear for a model whose schedule is linear already).

    ``uniform-linear`` is the baseline of a learned (or cosine) schedule in continuous time:
    uniform t on the linear schedule between the model's own endpoints. The continuous-time
    ELBO depends on the schedule only through its endpoints (Kingma et al. 2021 eq. 17 in
    gamma), so it estimates the same value; it is the estimator the model would have without
    its schedule (Kingma et al. sec. 5.1 compare the learned schedule with this one)."""
    cfg = dataclasses.replace(module.cfg, timestep_sampler=sampler, diffusion_form=form or module.cfg.diffusion_form)
    drop: tuple[str, ...] = ("sampler.",)  # sampler state is never carried over: importance warms up afresh
    if sampler == "uniform-linear":
        if module.cfg.schedule == "linear" or not module.continuous:
            return None
        g0, g1 = (float(g.detach()) for g in module.endpoints("cpu"))
        cfg = dataclasses.replace(cfg, timestep_sampler="uniform", schedule="linear", learn_endpoints=False,
                                  gamma_min=g0, gamma_max=g1)
        drop += ("schedule.", "time_map.")
    new = VDM(cfg, module.meta)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(drop)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    # Only sampler state and the (learned-schedule) time map may differ between configurations.
    bad = [k for k in list(missing) + list(unexpected) if not k.startswith(("sampler.", "time_map."))]
    assert not bad, f"weights do not fit the {sampler}/{cfg.diffusion_form} module: {bad}"
    if any(k.startswith("time_map.") for k in missing):
        return None  # the run never learned a time map: nothing to evaluate
    return new.to(next(module.parameters()).device).eval()


def fixed_noise_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of the noise held fixed for every t-only estimate of one batch."""
    return keyed_generator(seed, 8, batch_index)


def _ctx(step: int) -> StepContext:
    return StepContext(step=step, micro_step=0, grad_accum_steps=1, rank=0, world_size=1)


def _identity_gather(t: torch.Tensor) -> torch.Tensor:
    return t


def _batch_dict(x: torch.Tensor, labels: torch.Tensor | None, device) -> dict[str, torch.Tensor]:
    batch = {"x": x.to(device)}
    if labels is not None:
        batch["label"] = labels.to(device)
    return batch


@torch.no_grad()
def warm_up(module: VDM, x: torch.Tensor, labels: torch.Tensor | None, *, batch_size: int, seed: int,
            max_batches: int = 100_000) -> int:
    """Fill the importance sampler's history with training-like steps on random batches of
    ``x`` (separate draws from the measured batches) until every bin holds a full history;
    returns the number of batches used (0 for samplers without state)."""
    sampler = module.sampler
    device = next(module.parameters()).device
    rng = np.random.default_rng([seed, 3])
    n = 0
    while not sampler.ready():
        if n >= max_batches:
            raise RuntimeError(f"importance history not full after {max_batches} warm-up batches")
        idx = torch.from_numpy(rng.choice(x.shape[0], batch_size, replace=x.shape[0] < batch_size))
        batch = _batch_dict(x[idx], labels[idx] if labels is not None else None, device)
        out = module(batch, _ctx(n), noise_generator=keyed_generator(seed, 4, n),
                     time_generator=keyed_generator(seed, 5, n))
        module.after_micro_step(out, _identity_gather)
        module.after_optimizer_step(_identity_gather)
        n += 1
    return n


@dataclass
class _BatchEstimates:
    """One batch's ``num_repeats`` estimates: t and eps redrawn (with gradients), and t only."""

    full: np.ndarray  # [R] bits/dim, t and eps redrawn
    t_only: np.ndarray  # [R] bits/dim, eps fixed per batch
    grad_variance: float  # tr Cov(g), nan without gradients
    grad_norms: list[float]


def _estimate_batch(module: VDM, b: EvalBatch, m: int, step: int, *, num_repeats: int, seed: int,
                    grads: bool) -> _BatchEstimates:
    """Batch ``m``'s estimates from ctx.step ``step`` on (sampler state updated after each)."""
    params = [p for p in module.denoiser.parameters() if p.requires_grad]
    batch = _batch_dict(b.x, b.labels, next(module.parameters()).device)
    est, est_t, norms = [], [], []
    g_sum, g_sq = None, 0.0
    for r in range(num_repeats):
        with torch.set_grad_enabled(grads):
            out = module(batch, _ctx(step + r), noise_generator=keyed_generator(seed, 6, m, r),
                         time_generator=keyed_generator(seed, 7, m, r))
        est.append(float(out.bits_per_dim))
        if grads:
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(out.loss, params)]).double()
            g_sum = g if g_sum is None else g_sum + g
            g_sq += float(g @ g)
            norms.append(float(g.norm()))
        module.after_micro_step(out, _identity_gather)
        module.after_optimizer_step(_identity_gather)
        with torch.no_grad():  # the same eps for every r of this batch: only t changes
            out_t = module(batch, _ctx(step + r), noise_generator=fixed_noise_generator(seed, m),
                           time_generator=keyed_generator(seed, 9, m, r))
        est_t.append(float(out_t.bits_per_dim))
    R = num_repeats
    gvar = (g_sq - float(g_sum @ g_sum) / R) / (R - 1) if grads else float("nan")
    return _BatchEstimates(np.asarray(est), np.asarray(est_t), gvar, norms)


def measure(module: VDM, batches: list[EvalBatch], *, num_repeats: int, seed: int, grads: bool = True) -> SamplerStats:
    """``num_repeats`` estimates per batch with t and eps redrawn (sampler state updated after
    each, as in training), and as many with eps fixed per batch and only t redrawn. Every
    estimate gets a fresh ``ctx.step``; the sequence is the same for every sampler."""
    if num_repeats < 2:
        raise ValueError(f"num_repeats must be >= 2, got {num_repeats}")
    if not batches:
        raise ValueError("need at least one batch")
    R = num_repeats
    per = [_estimate_batch(module, b, m, MEASURE_STEP0 + m * R, num_repeats=R, seed=seed, grads=grads)
           for m, b in enumerate(batches)]
    M = len(batches)
    mean = float(np.mean([e.full.mean() for e in per]))
    exact = float(np.mean([b.exact_bpd for b in batches]))
    se = math.sqrt(sum(e.full.var(ddof=1) / R for e in per) + sum(b.exact_stderr_bpd**2 for b in batches)) / M
    nan = float("nan")
    return SamplerStats(
        mean_bpd=mean,
        variance_given_x=float(np.mean([e.full.var(ddof=1) for e in per])),
        variance_t_only=float(np.mean([e.t_only.var(ddof=1) for e in per])),
        grad_variance=float(np.mean([e.grad_variance for e in per])) if grads else nan,
        grad_norm_variance=float(np.mean([np.var(e.grad_norms, ddof=1) for e in per])) if grads else nan,
        grad_norm_mean=float(np.mean([n for e in per for n in e.grad_norms])) if grads else nan,
        bias_bpd=mean - exact,
        bias_sigma=(mean - exact) / se if se > 0 else nan,
        num_estimates=M * R,
    )


# ---------------------------------------------------------------------------------------


def _check_counts(num_batches: int, num_repeats: int, num_noise_samples: int) -> None:
    for name, value, least in (("num_batches", num_batches, 1), ("num_repeats", num_repeats, 2),
                               ("exact_noise_samples", num_noise_samples, 2)):
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


def _samplers_to_run(module: VDM, samplers: tuple[str, ...] | None) -> tuple[str, ...]:
    allowed = SAMPLERS if module.continuous else tuple(s for s in SAMPLERS if s not in CONTINUOUS_ONLY)
    samplers = tuple(samplers or allowed)
    bad = [s for s in samplers if s not in allowed]
    if bad or "uniform" not in samplers:
        raise ConfigError(f"--samplers must include uniform and be among {', '.join(allowed)}, got {', '.join(samplers)}")
    return samplers


def _measure_all(module: VDM, x: torch.Tensor, labels: torch.Tensor | None, batches: list[EvalBatch], *,
                 forms: tuple[str, ...], samplers: tuple[str, ...], batch_size: int, num_repeats: int, seed: int,
                 grads: bool) -> tuple[dict[str, dict[str, SamplerStats]], dict[str, dict[str, int]], dict[str, str]]:
    """Every (form, sampler) on the same batches: (stats by form and sampler, warm-up batches
    by form and sampler for the samplers that keep a loss history, samplers skipped with the
    reason)."""
    stats: dict[str, dict[str, SamplerStats]] = {f: {} for f in forms}
    warmup: dict[str, dict[str, int]] = {f: {} for f in forms}
    skipped: dict[str, str] = {}
    for form in forms:
        for s in samplers:
            m = with_sampler(module, s, form)
            if m is None:
                skipped[s] = SKIP_REASONS[s]
                continue
            n = warm_up(m, x, labels, batch_size=batch_size, seed=seed + 1)
            if n:
                warmup[form][s] = n
            stats[form][s] = measure(m, batches, num_repeats=num_repeats, seed=seed, grads=grads)
            st = stats[form][s]
            print(f"{form:>18} {s:>16}: var|x {st.variance_given_x:.3e}  var_t {st.variance_t_only:.3e}  "
                  f"grad var {st.grad_variance:.3e}  bias {st.bias_bpd:+.4f} bpd ({st.bias_sigma:+.2f} sigma)", flush=True)
    return stats, warmup, skipped


def run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    num_batches: int = 8,
    num_repeats: int = 32,
    batch_size: int | None = None,
    seed: int = 0,
    num_noise_samples: int = 4,
    num_quadrature_points: int = 64,
    samplers: tuple[str, ...] | None = None,
    grads: bool = True,
) -> dict[str, Any]:
    from pipeline.train.export import load_export

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    module, meta, info = load_export(run_dir)
    if not isinstance(module, VDM):
        raise ConfigError(f"{run_dir}: bench variance needs a VDM run, got objective {info['config'].get('objective')!r}")
    _check_counts(num_batches, num_repeats, num_noise_samples)
    x, labels, urls, split = load_pool(run_dir, info, data)
    B = batch_size or int((info["config"].get("data") or {}).get("batch_per_rank") or 64)
    if not 2 <= B <= x.shape[0]:
        raise ConfigError(f"--batch-size must be in 2..{x.shape[0]} (the {split} split's size), got {B}")
    cfg: VDMConfig = module.cfg
    samplers = _samplers_to_run(module, samplers)
    forms = FORMS if not module.continuous else ("denoising_matching",)

    batches = exact_batches(module, x, labels, num_batches=num_batches, batch_size=B, seed=seed,
                            num_noise_samples=num_noise_samples, num_quadrature_points=num_quadrature_points)
    d_var, floor = data_variance(batches), noise_floor(batches)
    stats, warmup, skipped = _measure_all(module, x, labels, batches, forms=forms, samplers=samplers, batch_size=B,
                                          num_repeats=num_repeats, seed=seed, grads=grads)
    head = cfg.diffusion_form if cfg.diffusion_form in stats else forms[0]
    return {
        "bench": "variance",
        "run": str(run_dir), "data": urls, "split": split, "model_step": info.get("step"),
        "num_timesteps": cfg.num_timesteps, "training_form": cfg.diffusion_form, "form": head,
        "batch_size": B, "num_batches": num_batches, "num_repeats": num_repeats,
        "network_evals_per_estimate": B,
        "exact_bpd": float(np.mean([b.exact_bpd for b in batches])),
        "exact_stderr_bpd": math.sqrt(sum(b.exact_stderr_bpd**2 for b in batches)) / len(batches),
        **summarise(stats, head, d_var, grads, floor, (_exact_baseline_name(module), uniform_variance(batches))),
        "importance_warmup_batches": warmup,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }


def _exact_baseline_name(module: VDM) -> str:
    """Which measured sampler :func:`~pipeline.bench.variance_batches.uniform_variance` computes:
    uniform t, or in continuous time on a schedule that is not linear uniform gamma, i.e.
    uniform t on the linear schedule between the endpoints."""
    return "uniform" if not module.continuous or module.cfg.schedule == "linear" else "uniform-linear"


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "variance", help="variance and bias of the VDM's per-batch ELBO estimate under each time-step sampler",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory with export/ (a trained VDM)")
    p.add_argument("--data", default=None, help="shards to measure on (default: the run's data.train_urls, "
                   "validation split when there is one)")
    p.add_argument("--num-batches", type=int, default=8, help="fixed data batches, each with its exact ELBO (default 8)")
    p.add_argument("--num-repeats", type=int, default=32, help="estimates per batch and sampler (default 32)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per estimate (default: the run's data.batch_per_rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-noise-samples", type=int, default=4, help="noise draws per term in the exact ELBO (>= 2)")
    p.add_argument("--quadrature-points", type=int, default=64, help="Gauss-Legendre nodes of the continuous-time exact ELBO")
    p.add_argument("--samplers", default=None, help="comma-separated subset (must include uniform); default: all that apply")
    p.add_argument("--no-grads", action="store_true", help="skip the gradient variance (faster)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw where each sampler's variance comes from "
                   "(data, noise floor, removable by t) to this PNG")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.quadrature_points < 1:
        raise ConfigError(f"--quadrature-points must be >= 1, got {args.quadrature_points}")
    samplers = tuple(s.strip() for s in args.samplers.split(",")) if args.samplers else None
    if args.plot and not Path(args.plot).parent.is_dir():
        raise ConfigError(f"--plot {args.plot!r}: its directory does not exist")
    out = run(args.run, data=args.data, num_batches=args.num_batches, num_repeats=args.num_repeats,
              batch_size=args.batch_size, seed=args.seed, num_noise_samples=args.exact_noise_samples,
              num_quadrature_points=args.quadrature_points, samplers=samplers, grads=not args.no_grads)
    if args.plot:
        from pipeline.bench.variance_plot import plot_decomposition

        out["plot"] = str(plot_decomposition(out, args.plot))
    print(json.dumps(out))
    return 0
