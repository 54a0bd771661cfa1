"""``pipeline bench variance --plot PATH``: where each sampler's variance comes from, as a figure.

One group of bars per time-step sampler (log scale, (bits/dim)^2): the total variance of the
per-batch estimate and its three parts (:func:`pipeline.bench.variance_summary.summarise`):
the data variance (the batch's own spread, the same for every unbiased sampler), the noise
floor (the variance eps leaves inside each term, which no choice of t removes at this cost)
and the rest (what a better choice of t could still remove, at most). Two lines: data +
floor, the least variance any time-step sampler can reach, and uniform / 100, the issue's
target; when the first lies above the second the target cannot be met by sampling t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_decomposition(result: dict[str, Any], path: str | Path) -> Path:
    """Draw ``result`` (the bench's JSON) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    parts = result["variance_decomposition"]
    samplers = list(parts)
    rows = [("total", [parts[s]["total"] for s in samplers]),
            ("data", [parts[s]["data"] for s in samplers]),
            ("noise floor", [parts[s]["noise_floor"] for s in samplers]),
            ("removable by t", [max(parts[s]["removable"], 0.0) for s in samplers])]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(samplers), 4.2))
    x = np.arange(len(samplers))
    width = 0.8 / len(rows)
    for i, (name, values) in enumerate(rows):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=name)
    limit = parts[samplers[0]]["data"] + parts[samplers[0]]["noise_floor"]
    ax.axhline(limit, color="k", ls="--", lw=1, label=f"data + floor (ceiling {result['ratio_ceiling_any_t_sampler']:.0f}x)")
    ax.axhline(parts["uniform"]["total"] / 100, color="r", ls=":", lw=1, label="uniform / 100")
    ax.set_yscale("log")
    ax.set_xticks(x, samplers)
    ax.set_ylabel("variance of the batch estimate, (bits/dim)$^2$")
    best = min(samplers, key=lambda s: parts[s]["total"])
    ax.set_title(f"T = {result.get('num_timesteps') or 'continuous'}, batch {result.get('batch_size')}, denoising "
                 f"matching: best {best} {parts['uniform']['total'] / parts[best]['total']:.1f}x", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
