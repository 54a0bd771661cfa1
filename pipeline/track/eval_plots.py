"""Plots of a ``pipeline evaluate`` result (its last stdout line, or the ``--out`` JSON) for
``pipeline report --eval``: what the evaluation compared, drawn against its reference.

 - GRF runs: the samples' power spectrum over the exact one per shell, with the standard
   error across samples and the band the exact field implies (``eval_spectrum.png``); for 2D
   fields the three Minkowski functionals against the exact lattice expectation, the
   continuum curves and the reference fields (``eval_minkowski.png``);
 - calorimeter runs: the mean longitudinal and radial profiles over the analytic ones
   (``eval_profiles.png``).

Each plot is drawn only when the result holds its keys; a result of another evaluation
draws nothing (and says so in ``make_report``'s output by its absence).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_eval(path: str | Path) -> dict[str, Any]:
    """The evaluation result in ``path``: a JSON object, or a log whose last line is one."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--eval {str(p)!r} is not a file")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for text in (p.read_text(encoding="utf-8"), lines[-1] if lines else ""):
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict) and "evaluation" in obj:
            return obj
    raise ValueError(f"--eval {str(p)!r} holds no `pipeline evaluate` result (a JSON object with an 'evaluation' key, "
                     f"the whole file or its last line)")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _arr(values: Any) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def plot_spectrum(result: dict[str, Any], path: Path) -> Path | None:
    """Power-spectrum ratio (samples / exact) per shell, with both standard errors."""
    import matplotlib.pyplot as plt

    ps = result.get("power_spectrum")
    if not ps:
        return None
    k, ratio = _arr(ps["k"]), _arr(ps["ratio"])
    se, se_exact = _arr(ps["stderr"]), _arr(ps["stderr_exact"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(k, 1 - 2 * se_exact, 1 + 2 * se_exact, color="gray", alpha=0.3, label="exact field: +-2 stderr")
    ax.errorbar(k, ratio, yerr=se, fmt="o-", ms=3, lw=1, capsize=2, label="samples / exact (+-1 stderr)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("k (radians per cell)")
    ax.set_ylabel("P_samples(k) / P_exact(k)")
    ax.set_title(f"power spectrum, {result.get('num_generated', '?')} samples; chi2 "
                 f"{result.get('power_spectrum_chi2', float('nan')):.1f} over {result.get('power_spectrum_num_bins')} shells",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_minkowski(result: dict[str, Any], path: Path) -> Path | None:
    """v0, v1, v2 against nu: samples (+-1 stderr), exact lattice, continuum, reference."""
    import matplotlib.pyplot as plt

    mk = result.get("minkowski")
    if not mk:
        return None
    nu = _arr(mk["nu"])
    titles = {"v0": "area fraction v0", "v1": "boundary length v1 per unit area",
              "v2": "Euler characteristic v2 per unit area"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (ax, name) in enumerate(zip(axes, mk["names"])):
        ax.plot(nu, _arr(mk["exact"][i]), "k-", lw=1.2, label="exact (lattice)")
        ax.plot(nu, _arr(mk["continuum"][i]), "k:", lw=1.0, label="continuum (Tomita)")
        if "reference_mean" in mk:
            ax.errorbar(nu, _arr(mk["reference_mean"][i]), yerr=_arr(mk["reference_stderr"][i]), fmt="s", ms=3,
                        color="gray", capsize=2, label="reference fields")
        ax.errorbar(nu, _arr(mk["mean"][i]), yerr=_arr(mk["stderr"][i]), fmt="o", ms=3, capsize=2, label="samples")
        z = result.get(f"minkowski_{name}_max_abs_z")
        ax.set_title(f"{titles.get(name, name)}" + (f"; max |z| {z:.1f}" if z is not None else ""), fontsize=9)
        ax.set_xlabel("threshold nu (units of sigma0)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_calo_profiles(result: dict[str, Any], path: Path) -> Path | None:
    """Mean longitudinal and radial profiles / E_inc over the analytic means, per bin."""
    import matplotlib.pyplot as plt

    if "longitudinal_ratio" not in result or "radial_ratio" not in result:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, name, xlabel in ((axes[0], "longitudinal", "layer"), (axes[1], "radial", "radial bin")):
        ratio = _arr(result[f"{name}_ratio"])
        ax.plot(np.arange(len(ratio)), ratio, "o-", ms=3, lw=1, label="samples / analytic")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean profile / analytic")
        ax.set_title(f"{name} profile; worst judged bin {result.get(f'{name}_max_rel_err', float('nan')):+.1%} "
                     f"(|z| {result.get(f'{name}_max_abs_z', float('nan')):.1f})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def eval_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Every plot ``result`` has the keys for, written into ``out``."""
    written = [plot_spectrum(result, out / "eval_spectrum.png"), plot_minkowski(result, out / "eval_minkowski.png"),
               plot_calo_profiles(result, out / "eval_profiles.png")]
    return [p for p in written if p is not None]
