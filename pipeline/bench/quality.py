"""``pipeline bench quality --config C --minutes M``: time to good samples, as a curve.

Trains the preset ``C`` from scratch through ``pipeline train`` (a subprocess, the project's
own entry point, nothing re-implemented) for a wall-clock budget of ``M`` minutes, stopping
it at fixed fractions of the budget (default 1/4, 1/2, 3/4, 1). Each stop is the loop's own
preemption path: at the deadline the bench sends SIGTERM, the loop checkpoints and exports at
the next step boundary and exits 75; the bench keeps a copy of that export and starts
``pipeline train`` again with the same arguments, which resumes exactly from the checkpoint.
The budget is the sum of the training processes' wall-clock times, start-ups and the
preemption checkpoints included (each restart costs one process start, a few seconds), so the
figure is what a user waiting for the run would see, conservatively.

Then every kept export is evaluated with ``pipeline evaluate``'s code (``eval/run.py``)
against the exact 2D Ising solution: the samples' mean energy per spin against the exact
L x L value (Kaufman; in % and in standard errors of the sample mean), the Wasserstein-1
distance between the samples' and the reference lattices' energy distributions over its noise
floor (the same distance between ``num_samples`` reference lattices and the rest, averaged
over disjoint draws: what a perfect model would score), and for VDMs the held-out negative
ELBO over the exact L x L entropy. The curve is printed (minutes -> figures); the last stdout
line is one JSON object with the figures at the end of the budget, the mean 1-minute load
average while training (which counts the training process itself, ~1) and the issue's targets.

The training processes start with SIGTERM ignored and the bench repeats the signal every
second until the process exits: a signal that arrives before the loop has installed its
handler (during imports and restore) is then lost rather than fatal, and the next one is
handled. Only the training process itself is signalled, never its data workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
REQUEUE_EXIT_CODE = 75  # pipeline.train.loop.REQUEUE_EXIT_CODE (not imported: that module imports torch)
SIGNAL_REPEAT_S = 1.0  # SIGTERM is repeated this often until the training process exits
MAX_FLOOR_SPLITS = 16  # disjoint reference draws averaged into the W1 noise floor
# The targets (issue 19 section 2) for configs/vdm_ising.yaml in 10 minutes on 2 quiet cores.
TARGET_ENERGY_REL_ERR = 0.01
TARGET_ENERGY_SIGMA = 2.0
TARGET_W1_OVER_FLOOR = 1.5
TARGET_ELBO_OVER_ENTROPY = 1.02


@dataclass
class QualityOptions:
    config: str
    minutes: float  # wall-clock training budget
    out: Path  # bench directory: run/ (the training run), at-<fraction>/export, train.log
    overrides: list[str] = field(default_factory=list)  # dotted overrides for `pipeline train`
    data: str | None = None  # reference shards for the evaluation (default: the preset's data)
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    num_samples: int = 1000  # generated lattices per checkpoint
    num_steps: int | None = None  # sampling steps (None: the model's default)
    elbo_num_samples: int = 128  # held-out lattices for the exact ELBO (0: skip)
    elbo_noise_samples: int = 4
    seed: int = 0

    def validate(self) -> None:
        if not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ConfigError(f"--minutes must be a finite number > 0, got {self.minutes}")
        f = self.fractions
        if not f or any(not 0 < x <= 1 for x in f) or any(b <= a for a, b in zip(f, f[1:])) or f[-1] != 1.0:
            raise ConfigError(f"--fractions must increase strictly within (0, 1] and end at 1 (the end of the "
                              f"budget), got {list(f)}")
        if self.num_samples < 2:
            raise ConfigError(f"--num-samples must be >= 2, got {self.num_samples}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"--num-steps must be >= 1, got {self.num_steps}")
        if self.elbo_num_samples < 0 or self.elbo_num_samples == 1 or self.elbo_noise_samples < 2:
            raise ConfigError(f"need --elbo-num-samples 0 (skip) or >= 2 and --elbo-noise-samples >= 2, got "
                              f"{self.elbo_num_samples} and {self.elbo_noise_samples}")
        if any(o.split("=", 1)[0].strip() == "run.dir" for o in self.overrides):
            raise ConfigError("run.dir is the bench's (<--out>/run): give --out instead of a run.dir override")
        if self.out.exists() and any(self.out.iterdir()):
            raise ConfigError(f"--out {self.out} exists and is not empty: the bench trains from scratch, give a "
                              f"fresh directory")

    def train_overrides(self) -> list[str]:
        """W&B off unless the user says otherwise (a later override wins); run.dir the bench's."""
        return ["track.wandb=off", *self.overrides, f"run.dir={self.out / 'run'}"]


# ----------------------------------------------------------------------------------------
# Training for a wall-clock budget


@dataclass
class Stop:
    """Where training stood at one fraction of the budget."""

    fraction: float
    minutes: float  # training wall time so far (all processes)
    step: int
    finished: bool  # train.num_steps was reached before this fraction's deadline
    export_dir: Path  # a run-directory-shaped copy holding export/


def _ignore_sigterm() -> None:  # preexec_fn of the training process, see the module docstring
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_until(cmd: list[str], seconds: float, log_path: Path, loads: list[float]) -> tuple[int, float]:
    """Run ``cmd`` until it exits, SIGTERM'ing it from ``seconds`` on (repeated); return its
    exit code and wall time. The 1-minute load average is appended to ``loads`` once a second."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigterm,
                                start_new_session=True)
    try:
        while True:
            left = seconds - (time.monotonic() - t0)
            if left <= 0:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SIGNAL_REPEAT_S if left <= 0 else min(left, SIGNAL_REPEAT_S))
                return proc.returncode, time.monotonic() - t0
            except subprocess.TimeoutExpired:
                loads.append(os.getloadavg()[0])
    finally:
        if proc.poll() is None:  # the bench itself was interrupted: take the run's processes along
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _export_step(export_dir: Path) -> int:
    return int(json.loads((export_dir / "export" / "export.json").read_text())["step"])


def train_for_budget(opts: QualityOptions, loads: list[float]) -> list[Stop]:
    """Train in chunks ending at each fraction of the budget; keep each chunk's export."""
    run_dir, log_path = opts.out / "run", opts.out / "train.log"
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", opts.config, *opts.train_overrides()]
    budget_s, used_s = 60.0 * opts.minutes, 0.0
    stops: list[Stop] = []
    for fraction in opts.fractions:
        if stops and stops[-1].finished:  # nothing left to train: the same export stands for this fraction
            stops.append(Stop(fraction, stops[-1].minutes, stops[-1].step, True, stops[-1].export_dir))
            continue
        code, wall_s = run_until(cmd, fraction * budget_s - used_s, log_path, loads)
        used_s += wall_s
        if code not in (0, REQUEUE_EXIT_CODE):
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise (ConfigError if code == 2 else RuntimeError)(
                f"pipeline train exited {code} in the chunk ending at {fraction:g} of the budget; the end of "
                f"{log_path}:\n" + "\n".join(tail))
        keep = opts.out / f"at-{fraction:g}"
        shutil.copytree(run_dir / "export", keep / "export")
        stops.append(Stop(fraction, used_s / 60.0, _export_step(keep), code == 0, keep))
        print(f"trained to {fraction:g} of the budget: step {stops[-1].step}, {used_s / 60:.2f} min"
              + (" (train.num_steps reached)" if code == 0 else ""), flush=True)
    return stops


# ----------------------------------------------------------------------------------------
# Evaluation of each kept export


def energy_w1_floor(reference_x, temperature: float, num_generated: int, seed: int) -> float:
    """The noise floor of ``w1_energy``: the mean W1 distance between the energy distribution
    of ``num_generated`` reference lattices and that of the remaining ones, over up to
    MAX_FLOOR_SPLITS disjoint draws. A model that samples the true distribution scores this
    on average (its samples are compared with all reference lattices, barely more)."""
    import numpy as np

    from pipeline.eval.ising import measure
    from pipeline.physics.observables import wasserstein1

    energies = measure(reference_x, temperature).energies
    n = num_generated
    num_splits = min(MAX_FLOOR_SPLITS, len(energies) // n - 1)
    if num_splits < 1:
        raise ConfigError(f"the reference holds {len(energies)} lattices; a W1 noise floor for {n} generated "
                          f"samples needs at least {2 * n}: lower --num-samples")
    perm = np.random.default_rng(seed).permutation(len(energies))
    dists = []
    for i in range(num_splits):
        rest = np.ones(len(energies), dtype=bool)
        rest[perm[i * n:(i + 1) * n]] = False
        dists.append(wasserstein1(energies[~rest], energies[rest]))
    return float(np.mean(dists))


def evaluate_stop(stop: Stop, data: str, opts: QualityOptions) -> dict[str, Any]:
    """One row of the curve: the export's samples against the exact solution (``w1_over_floor``
    is added by the caller, which computes the floor once)."""
    from pipeline.eval.run import EvalOptions, evaluate_run

    r = evaluate_run(stop.export_dir, data, EvalOptions(
        num_samples=opts.num_samples, seed=opts.seed, num_steps=opts.num_steps,
        elbo_num_samples=opts.elbo_num_samples, elbo_noise_samples=opts.elbo_noise_samples))
    if r["evaluation"] != "ising" or "per_temperature" in r:
        raise ConfigError(f"bench quality evaluates models of 2D Ising lattices at one temperature; {data} gave "
                          f"a {r['evaluation']!r} evaluation" + (" over several temperatures" if "per_temperature"
                                                                 in r else ""))
    e, se, exact = r["energy_per_spin"], r["energy_per_spin_stderr"], r["energy_exact_finite"]
    elbo, entropy = r.get("bits_per_spin"), r.get("entropy_bits_per_spin_finite")
    return {
        "fraction": stop.fraction, "minutes": stop.minutes, "step": stop.step, "finished": stop.finished,
        "temperature": r["temperature"], "energy_per_spin": e, "energy_stderr": se, "energy_exact": exact,
        "energy_rel_err": (e - exact) / abs(exact), "energy_err_sigma": (e - exact) / se,
        "w1_energy": r["w1_energy"],
        "bits_per_spin": elbo, "bits_per_spin_stderr": r.get("bits_per_spin_stderr"),
        "entropy_bits_per_spin": entropy,
        "elbo_over_entropy": elbo / entropy if elbo is not None and entropy is not None else None,
        "eval_s": r["timings_s"]["total_s"],
    }


def evaluate_stops(stops: list[Stop], data: str, opts: QualityOptions) -> list[dict[str, Any]]:
    """The curve: one row per stop, each export evaluated once, W1 over its noise floor."""
    from pipeline.eval.reference import load_reference

    rows: list[dict[str, Any]] = []
    by_step: dict[int, dict[str, Any]] = {}
    w1_floor = None
    for stop in stops:
        if stop.step not in by_step:  # a fraction after the run finished shares its export
            by_step[stop.step] = evaluate_stop(stop, data, opts)
        row = {**by_step[stop.step], "fraction": stop.fraction}
        if w1_floor is None:
            reference = load_reference(data, split="all")  # what evaluate_run compared with
            w1_floor = energy_w1_floor(reference.x, row["temperature"], opts.num_samples, opts.seed)
        row.update(w1_floor=w1_floor, w1_over_floor=row["w1_energy"] / w1_floor)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def targets(row: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's four quality targets on one row (None: not measured, e.g. no ELBO)."""
    ratio = row["elbo_over_entropy"]
    return {
        "energy_within_1pct": abs(row["energy_rel_err"]) <= TARGET_ENERGY_REL_ERR,
        "energy_within_2_sigma": abs(row["energy_err_sigma"]) <= TARGET_ENERGY_SIGMA,
        "w1_le_1.5_floor": row["w1_over_floor"] <= TARGET_W1_OVER_FLOOR,
        "elbo_le_1.02_entropy": None if ratio is None else ratio <= TARGET_ELBO_OVER_ENTROPY,
    }


def _line(row: dict[str, Any]) -> str:
    elbo = "n/a" if row["elbo_over_entropy"] is None else f"{row['elbo_over_entropy']:.4f} x entropy"
    return (f"{row['minutes']:6.2f} min  step {row['step']:>6}  energy {row['energy_per_spin']:.4f} +- "
            f"{row['energy_stderr']:.4f} ({100 * row['energy_rel_err']:+.2f} %, {row['energy_err_sigma']:+.1f} "
            f"sigma)  W1 {row['w1_over_floor']:.2f} x floor  ELBO {elbo}")


# ----------------------------------------------------------------------------------------
# Command line


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "quality", help="train a preset for a wall-clock budget; sample quality vs the exact solution over time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="preset (2D Ising data at one temperature), e.g. "
                   "configs/vdm_ising.yaml")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget in minutes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for pipeline train")
    p.add_argument("--out", default=None, help="bench directory, fresh (default runs/bench-quality-<time>)")
    p.add_argument("--data", default=None, help="reference shards for the evaluation (default: the preset's)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                   help="checkpoints at these fractions of the budget (default 0.25 0.5 0.75 1)")
    p.add_argument("--num-samples", type=int, default=1000, help="generated lattices per checkpoint (default 1000)")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--elbo-num-samples", type=int, default=128, help="held-out lattices for the exact ELBO "
                   "(default 128; 0 skips it)")
    p.add_argument("--elbo-noise-samples", type=int, default=4, help="noise draws per lattice (default 4)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (training: run.seed)")
    p.set_defaults(func=_main)


def _check_inputs(opts: QualityOptions) -> str:
    """Every user error before anything is written; returns the evaluation data."""
    from pipeline.config import load_config
    from pipeline.data.stream import read_meta

    opts.validate()
    cfg = load_config(opts.config, opts.train_overrides())
    data = opts.data or cfg.data.train_urls
    meta = read_meta(data)
    shape = tuple(meta.sample_shape)
    if meta.data_kind != "spins" or not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
        raise ConfigError(f"bench quality evaluates 2D Ising lattices; {data} holds {meta.data_kind!r} data of "
                          f"shape {shape}")
    return data


def _main(args) -> int:
    out = Path(args.out or f"runs/bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    opts = QualityOptions(config=args.config, minutes=args.minutes, out=out, overrides=list(args.overrides),
                          data=args.data, fractions=tuple(args.fractions), num_samples=args.num_samples,
                          num_steps=args.num_steps, elbo_num_samples=args.elbo_num_samples,
                          elbo_noise_samples=args.elbo_noise_samples, seed=args.seed)
    data = _check_inputs(opts)
    out.mkdir(parents=True, exist_ok=True)
    loads: list[float] = []
    stops = train_for_budget(opts, loads)
    load_avg = sum(loads) / len(loads) if loads else os.getloadavg()[0]
    rows = evaluate_stops(stops, data, opts)
    last = rows[-1]
    keys = ("energy_rel_err", "energy_err_sigma", "w1_over_floor", "elbo_over_entropy", "minutes", "step")
    print(json.dumps({"bench": "quality", "config": opts.config, "overrides": opts.overrides,
                      "minutes_budget": opts.minutes, **{k: last[k] for k in keys}, "load_avg": load_avg,
                      "num_samples": opts.num_samples, "targets": targets(last), "rows": rows, "out": str(out)}))
    return 0
