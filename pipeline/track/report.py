"""Static plots of a run from its ``metrics.jsonl`` (matplotlib, Agg): no W&B account needed."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.run_dir import RunDir

ELBO_KEYS = ["vdm/bits_per_dim", "vdm/recon_bpd", "vdm/prior_bpd", "vdm/diffusion_bpd"]
# (panel title, keys): a panel is drawn when any of its keys was logged.
GAN_PANELS = [
    ("discriminator outputs", ["d/d_real", "d/d_fake"]),
    ("losses", ["d/loss", "g/loss"]),
    ("divergence estimates", ["d/js_estimate", "d/wasserstein_estimate"]),
    ("gradients", ["d/grad_norm", "g/grad_norm", "d/gradient_penalty", "d/gp"]),
    ("balance flags", ["d/d_dominates", "d/g_collapsed", "d/diversity_ratio"]),
]


@dataclass
class RunLog:
    """The parsed lines of a metrics.jsonl."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    events: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    num_bad_lines: int = 0


def read_metrics(path: str | Path) -> RunLog:
    """Parse metrics.jsonl; malformed lines (a torn last line after a crash) are counted, not fatal."""
    log = RunLog()
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                log.num_bad_lines += 1
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                log.num_bad_lines += 1
            elif obj.get("event") == "profile":
                log.profiles.append(obj)
            elif obj.get("event") == "image":
                log.images.append(obj)
            elif "event" in obj:
                log.events.append(obj)
            else:
                for k, v in obj.items():
                    if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                        log.series.setdefault(k, []).append((obj["step"], float(v)))
    return log


def _plot_series(ax: Any, log: RunLog, keys: list[str]) -> bool:
    drawn = False
    for k in keys:
        pts = log.series.get(k)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.2)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return drawn


def _panel_figure(log: RunLog, panels: list[tuple[str, list[str]]], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    present = [(t, ks) for t, ks in panels if any(k in log.series for k in ks)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.6 * len(present)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], present):
        _plot_series(ax, log, keys)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _checkpoint_lines(ax: Any, log: RunLog) -> None:
    for ev in log.events:
        if ev["event"] == "checkpoint" and ev["step"] >= 0:
            ax.axvline(ev["step"], color="gray", lw=0.6, ls=":")


def plot_elbo(log: RunLog, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if not any(k in log.series for k in ELBO_KEYS):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_series(ax, log, ELBO_KEYS)
    _checkpoint_lines(ax, log)
    ax.set_ylabel("bits per dim")
    ax.set_title("VDM ELBO terms (dotted: checkpoints)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_profiles(log: RunLog, path: Path, max_curves: int = 6) -> Path | None:
    """Per-t loss profile: the last few logged profiles of each name, coloured by step."""
    import matplotlib.pyplot as plt

    if not log.profiles:
        return None
    names = sorted({p["name"] for p in log.profiles})
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 3.2 * len(names)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes[:, 0], names):
        curves = [p for p in log.profiles if p["name"] == name][-max_curves:]
        for i, p in enumerate(curves):
            pts = [(t, m) for t, m in zip(p["t"], p["mean"]) if m is not None]
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker=".", lw=1,
                    color=cmap(i / max(1, len(curves) - 1)), label=f"step {p['step']}")
        ax.set_xlabel("t")
        ax.set_ylabel("mean loss")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _prefix_panels(log: RunLog, prefixes: list[str]) -> list[tuple[str, list[str]]]:
    keys = sorted(k for k in log.series if any(k.startswith(p) for p in prefixes))
    groups: dict[str, list[str]] = {}
    for k in keys:  # phys/energy_per_spin, phys/energy_per_spin_ref, ... share a panel
        base = re.sub(r"_(ref|w1)$", "", k)
        groups.setdefault(base, []).append(k)
    return [(g, ks) for g, ks in groups.items()]


def _training_panels(log: RunLog) -> list[tuple[str, list[str]]]:
    keys = sorted(log.series)
    groups = [
        ("learning rate", [k for k in keys if re.search(r"(^|/)lr$", k)]),
        ("gradient norms", [k for k in keys if "grad_norm" in k]),
        ("skipped steps / corrupt samples", [k for k in keys if re.search(r"skipped|bad_steps|corrupt", k)]),
    ]
    return [(t, ks) for t, ks in groups if ks]


def latest_sample_grid(run_dir: Path) -> Path | None:
    pngs = list(RunDir(run_dir).samples.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9][0-9].png"))
    if not pngs:
        return None
    return max(pngs, key=lambda p: (int(p.stem.rsplit("-", 1)[1]), p.stat().st_mtime))


def make_report(run_dir: str | Path, out_dir: str | Path | None = None, eval_path: str | Path | None = None) -> list[Path]:
    """Render the plots of ``run_dir`` into ``out_dir`` (default ``run_dir/report``), and those
    of a ``pipeline evaluate`` result in ``eval_path`` (``pipeline/track/eval_plots.py``).

    Returns the paths written. Raises ``ValueError`` when ``run_dir`` is not a run directory
    or ``eval_path`` holds no evaluation result (both before anything is written).
    """
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    rd = RunDir(run_dir)
    metrics_path = rd.metrics
    if not metrics_path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no {metrics_path.name}: not a run directory, or the run never logged")
    log = read_metrics(metrics_path)
    if not (log.series or log.profiles or log.images):
        raise ValueError(f"{metrics_path} holds no metrics ({log.num_bad_lines} unreadable lines)")
    from pipeline.track.eval_plots import eval_plots, read_eval

    result = read_eval(eval_path) if eval_path is not None else None
    out = Path(out_dir) if out_dir is not None else rd.report
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. --out under /proc, or a file's path (issue 15 item 10)
        raise ValueError(f"cannot create the output directory {str(out)!r}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"the output directory {str(out)!r} is not writable")
    written = [
        plot_elbo(log, out / "elbo.png"),
        plot_profiles(log, out / "t_profile.png"),
        _panel_figure(log, GAN_PANELS, out / "gan_balance.png"),
        _panel_figure(log, _prefix_panels(log, ["phys/"]), out / "physics.png"),
        _panel_figure(log, _training_panels(log), out / "training.png"),
        _panel_figure(log, _prefix_panels(log, ["perf/", "sys/"]), out / "throughput.png"),
    ]
    if result is not None:
        written.extend(eval_plots(result, out))
    grid = latest_sample_grid(run_dir)
    if grid is not None:
        written.append(Path(shutil.copyfile(grid, out / "latest_samples.png")))
    return [p for p in written if p is not None]
