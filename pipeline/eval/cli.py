"""``pipeline evaluate --run DIR [--data SHARDS]``: science evaluation of a trained run.

Prints a short human-readable summary, then, as the last stdout line, one JSON object with
the results (also written to ``--out``). Exit code 0 whether or not anything is flagged:
flags are findings about the model, listed in the JSON's ``flags``; ``--fail-on-flags``
makes them exit 1 (for CI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from pipeline.errors import ConfigError
from pipeline.run_dir import RunDir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate a run's samples against reference data and exact results",
        description="Sample from a run's exported weights and compare with reference shards: for 2D Ising "
        "data the energy, |magnetisation|, specific heat, susceptibility and correlations against the Monte "
        "Carlo reference and the exact solution (Onsager, Yang, Kaufman), with Wasserstein-1 distances and "
        "two-sample tests; for VDMs the held-out ELBO in bits against the exact entropy. Digits: Fréchet "
        "distance in a small classifier's features. Gaussian mixtures: exact log-likelihood and mode coverage. "
        "The last stdout line is a JSON object.",
    )
    p.add_argument("--run", default=None, help="run directory (holds export/)")
    p.add_argument("--samples", default=None, help="instead of --run: a sample set written by `pipeline sample "
                   "--out DIR` (2D Ising), read shard by shard in bounded memory; needs --data")
    p.add_argument("--data", default=None,
                   help="reference shards: a directory with manifest.json or tar path(s) (default with --run: the "
                        "run's own data.train_urls, as `pipeline bench variance`; a pipe: command stored in the run "
                        "is never run: name it here)")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="samples to generate (per temperature for conditional models; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (diffusion models)")
    p.add_argument("--sampler", default=None, help="VDMs: ancestral (default), ddim or dpm-solver")
    p.add_argument("--eta", type=float, default=None, help="--sampler ddim: noise scale in [0, 1] (default 0)")
    p.add_argument("--grid", default=None, help="VDMs: noise levels uniform in time, in logsnr, or "
                   "spin-variance (+-1 spins); default: the model's vdm.sample_grid")
    p.add_argument("--temperature", type=float, action="append", default=None,
                   help="Ising: evaluate at this temperature (repeat for several); default: those in the data")
    p.add_argument("--elbo-num-samples", type=int, default=256,
                   help="VDMs: held-out samples (per temperature) for the exact ELBO; 0 skips it (default 256)")
    p.add_argument("--elbo-noise-samples", type=int, default=8,
                   help="VDMs: noise draws per sample and term in the exact ELBO (default 8)")
    p.add_argument("--z-max", type=float, default=5.0, help="flag means more than this many sigma off (default 5)")
    p.add_argument("--alpha", type=float, default=1e-3, help="flag two-sample tests with p below this (default 1e-3)")
    p.add_argument("--fail-on-flags", action="store_true", help="exit with status 1 when anything is flagged")
    p.set_defaults(func=_evaluate)


def _summary(r: dict) -> list[str]:
    def f(key: str) -> str:
        v = r.get(key)
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"evaluated {r['run']} (step {r.get('step')}, {r.get('objective')}) on {r['data']}: {r['evaluation']}"]
    if r["evaluation"] == "ising":
        lines.append(f"  temperatures {r['temperatures']}")
        lines.append(f"  energy/spin {f('energy_per_spin')} (reference {f('energy_reference')}, exact infinite "
                     f"{f('energy_exact')}, exact finite {f('energy_exact_finite')}); W1 {f('w1_energy')}")
        lines.append(f"  |m| {f('abs_magnetisation')} (reference {f('abs_magnetisation_reference')}, Yang "
                     f"{f('magnetisation_exact')}); W1 {f('w1_abs_magnetisation')}")
        if "bits_per_spin" in r:
            lines.append(f"  ELBO {f('bits_per_spin')} bits/spin vs exact entropy {f('entropy_bits_per_spin_finite')} "
                         f"(infinite lattice {f('entropy_bits_per_spin')}): gap {f('gap_bits_per_spin')}")
    elif r["evaluation"] == "digits":
        lines.append(f"  Fréchet distance {f('frechet_distance')} (real-vs-real baseline {f('frechet_distance_baseline')})")
    elif r["evaluation"] == "gmm":
        lines.append(f"  mean log-likelihood {f('mean_log_likelihood')} (true samples "
                     f"{f('reference_mean_log_likelihood')}); modes covered {r['num_modes_covered']}/{r['num_modes']}")
    if "bits_per_dim" in r:
        lines.append(f"  ELBO {f('bits_per_dim')} bits/dim")
    for flag in r.get("flags", []):
        lines.append(f"  FLAG: {flag}")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return lines


def _evaluate_samples(args) -> int:
    """``--samples DIR``: the streamed evaluation of a sample set on disk (:mod:`pipeline.eval.sample_set`)."""
    from pipeline.eval.reference import load_reference
    from pipeline.eval.sample_set import evaluate_sample_set

    if args.data is None:
        raise ConfigError("--samples needs --data: the reference shards to judge the sample set against")
    try:
        reference = load_reference(args.data, split="all")
        temps = args.temperature
        if not temps:
            col = reference.json_column("temperature")
            temps = sorted(set(col.tolist())) if col is not None else []
        if len(temps) != 1:
            raise ConfigError(f"--samples needs one temperature: give --temperature T (the reference data has "
                              f"{temps or 'none'})")
        result = evaluate_sample_set(args.samples, reference.x, temps[0])
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    result["data"] = str(args.data)
    print(f"evaluated {result['num_samples']} samples in {args.samples} (at most {result['max_samples_in_memory']} "
          f"in memory): energy/spin {result['energy_per_spin']:.4f} +- {result['energy_per_spin_stderr']:.4f} "
          f"(exact finite {result['energy_exact_finite']:.4f}); W1 {result['w1_energy']:.4f}")
    print(json.dumps(result, allow_nan=False), flush=True)
    return 0


def _evaluate(args) -> int:
    if (args.run is None) == (args.samples is None):
        raise ConfigError("give exactly one of --run (sample from a run) and --samples (a sample set on disk)")
    if args.samples is not None:
        return _evaluate_samples(args)
    from pipeline.eval.run import EvalOptions, evaluate_run
    from pipeline.objectives.vdm.config import sampler_from_options

    opts = EvalOptions(
        num_samples=args.num_samples, seed=args.seed, num_steps=args.num_steps, sampler=sampler_from_options(args.sampler, args.eta, args.grid),
        temperatures=args.temperature,
        elbo_num_samples=args.elbo_num_samples, elbo_noise_samples=args.elbo_noise_samples,
        z_max=args.z_max, alpha=args.alpha,
    )
    if not RunDir(args.run).export.is_dir():
        raise ConfigError(f"--run {args.run}: no export/ directory (is it a run directory that saved a checkpoint?)")
    try:
        result = evaluate_run(args.run, args.data, opts)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    line = json.dumps(result, allow_nan=False)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, out)
    for s in _summary(result):
        print(s)
    print(line, flush=True)
    return 1 if (args.fail_on_flags and result.get("flags")) else 0
