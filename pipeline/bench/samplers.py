"""`pipeline bench samplers --run R --data D`: sample quality and speed per sampler and step count.

For each sampler (ancestral, DDIM, DPM-Solver++(2M)) and number of steps, draws samples from
the run's export and evaluates them with `pipeline evaluate`'s code against the exact
solution: for 2D Ising data the mean energy per spin (its error against the exact
finite-lattice value, in % and in standard errors), for Gaussian random fields the worst
relative error of the power spectrum over k shells. Every row also has samples/s (sampling
only, this machine, as loaded as it is). The 128-step ancestral sampler is the reference the
issue names: each Ising row says how many standard errors it lies from it, and the last line
(one JSON object) says whether a sampler at <= 32 steps is within 1 standard error of it.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from pipeline.errors import ConfigError

DEFAULT_STEPS = (8, 16, 32, 64, 128, 256)
DEFAULT_SAMPLERS = ("ancestral", "ddim", "dpm-solver")
REFERENCE = ("ancestral", 128)  # the reference: 128-step ancestral sampling
FEW_STEPS = 32  # target: a sampler at <= this many steps within 1 standard error of the reference


def measure(run: str, data: str, name: str, num_steps: int, *, num_samples: int, seed: int, eta: float | None,
            grid: str) -> dict[str, Any]:
    """One (sampler, steps) cell: the evaluation's error figure and samples/s."""
    from pipeline.eval.run import EvalOptions, evaluate_run
    from pipeline.objectives.vdm.config import SamplerConfig

    sampler = SamplerConfig(name, eta=eta if name == "ddim" else None, spacing=grid)
    r = evaluate_run(run, data, EvalOptions(num_samples=num_samples, seed=seed, num_steps=num_steps,
                                            sampler=sampler, elbo_num_samples=0))
    row: dict[str, Any] = {"sampler": name, "num_steps": num_steps,
                           "samples_per_s": r["num_generated"] / r["timings_s"]["sample_s"]}
    if r["evaluation"] == "ising":
        e, se, exact = r["energy_per_spin"], r["energy_per_spin_stderr"], r["energy_exact_finite"]
        row.update(energy_per_spin=e, energy_stderr=se, energy_exact=exact, energy_rel_err=(e - exact) / abs(exact),
                   energy_err_sigma=(e - exact) / se)
    elif r["evaluation"] == "grf":
        row.update(power_spectrum_max_rel_err=r["power_spectrum_max_rel_err"],
                   power_spectrum_chi2_per_bin=r["power_spectrum_chi2_per_bin"])
    else:
        raise ConfigError(f"bench samplers evaluates 2D Ising and Gaussian-random-field runs; {data} is "
                          f"{r['evaluation']!r} data")
    return row


def compare_with_reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each Ising row's distance from the 128-step ancestral energy in joint standard errors,
    and whether a sampler at <= 32 steps is within 1 of it (the issue's target)."""
    ref = next((r for r in rows if (r["sampler"], r["num_steps"]) == REFERENCE), None)
    if ref is None or "energy_per_spin" not in ref:
        return {"target_met": None, "reference": None}
    for r in rows:
        se = math.hypot(r["energy_stderr"], ref["energy_stderr"])
        r["sigma_vs_reference"] = (r["energy_per_spin"] - ref["energy_per_spin"]) / se
    met = [f"{r['sampler']}@{r['num_steps']}" for r in rows
           if r["num_steps"] <= FEW_STEPS and r is not ref and abs(r["sigma_vs_reference"]) <= 1.0]
    return {"target_met": bool(met), "within_1_sigma_at_le_32_steps": met,
            "reference": {"sampler": REFERENCE[0], "num_steps": REFERENCE[1],
                          "energy_per_spin": ref["energy_per_spin"], "energy_stderr": ref["energy_stderr"]}}


def _line(r: dict[str, Any]) -> str:
    if "energy_per_spin" in r:
        fig = (f"energy {r['energy_per_spin']:.4f} +- {r['energy_stderr']:.4f} ({100 * r['energy_rel_err']:+.2f} % "
               f"of exact, {r['energy_err_sigma']:+.1f} sigma)")
        if "sigma_vs_reference" in r:
            fig += f", {r['sigma_vs_reference']:+.2f} sigma from ancestral@128"
    else:
        fig = f"power spectrum max rel err {100 * r['power_spectrum_max_rel_err']:.1f} %"
    return f"{r['sampler']:>11} {r['num_steps']:>4} steps: {fig}; {r['samples_per_s']:.1f} samples/s"


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "samplers", help="sample quality and samples/s per VDM sampler and number of steps",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory with export/ (a continuous-time VDM for > T-1 steps)")
    p.add_argument("--data", required=True, help="reference shards (2D Ising or GRF), as for `pipeline evaluate`")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="step counts (default 8 .. 256)")
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), help="default: all three")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per cell (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (default 0)")
    p.add_argument("--grid", default="time", help="time (default), logsnr or spin-variance")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from pipeline.objectives.vdm.config import SamplerConfig

    for name in args.samplers:
        SamplerConfig(name, eta=args.eta if name == "ddim" else None, spacing=args.grid).validate()
    if any(n < 1 for n in args.steps):
        raise ConfigError(f"--steps must all be >= 1, got {args.steps}")
    rows = []
    cells = [(name, n) for name in args.samplers for n in args.steps]
    for i, (name, n) in enumerate(cells):
        # Independent noise per cell, so that two cells' standard errors combine in quadrature.
        try:
            rows.append(measure(args.run, args.data, name, n, num_samples=args.num_samples,
                                seed=args.seed + 1000 * i, eta=args.eta, grid=args.grid))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        print(_line(rows[-1]), flush=True)
    summary = compare_with_reference(rows)
    if summary["reference"] is not None:
        print("against ancestral@128:")
        for r in rows:
            print("  " + _line(r))
    print(json.dumps({"bench": "samplers", "run": args.run, "num_samples": args.num_samples, "grid": args.grid,
                      "eta": args.eta, "rows": rows, **summary}))
    return 0
