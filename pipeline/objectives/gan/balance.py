"""The adversarial balance: thresholds and statistics that flag the classic GAN failures.

What D's phase reports besides its loss: the Jensen-Shannon lower bound's offset
(:data:`LOG4`), the D-dominance threshold (vanishing G gradient) and the mode-collapse
threshold on the diversity ratio (mean pairwise distance of fakes over that of reals).
These are the only GAN balance flags the loop logs (``d/d_dominates``, ``d/g_collapsed``,
``d/diversity_ratio``).
"""

from __future__ import annotations

import math

import torch

LOG4 = math.log(4.0)

# d_dominates: for the logistic losses, d(log(1 - D(G(h)))) / d logit = -D(G(h)), so the
# minimax generator's per-sample gradient is scaled by D(G(h)). When the mean of D(G(h)) is
# below 5% of its maximum (1), G learns at < 1/20 of its possible rate: the vanishing-gradient
# regime of Goodfellow et al. 2014 Sec. 3 / Arjovsky & Bottou 2017 Thm. 2.4.
D_DOMINATES_FAKE_PROB = 0.05
# g_collapsed: independent draws from p_r have mean pairwise distance ratio 1 by definition;
# fakes on average 5x closer to each other than reals are indicates G maps most h to a few
# points (mode collapse). A coarse alarm, not a metric: compare diversity_ratio across runs.
G_COLLAPSED_DIVERSITY_RATIO = 0.2
DIVERSITY_MAX_SAMPLES = 64  # pairwise distances on at most this many samples (cost ~ n^2)


def _mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    x = x[:DIVERSITY_MAX_SAMPLES].flatten(1).float()
    n = x.shape[0]
    if n < 2:
        return x.new_tensor(float("nan"))
    return torch.cdist(x, x).sum() / (n * (n - 1))


def diversity_balance(fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(diversity_ratio, g_collapsed): the fakes' mean pairwise distance over the reals' (on
    at most DIVERSITY_MAX_SAMPLES of each), and 1.0 where it is below
    G_COLLAPSED_DIVERSITY_RATIO (else 0.0)."""
    ratio = _mean_pairwise_distance(fake) / _mean_pairwise_distance(real)
    return ratio, (ratio < G_COLLAPSED_DIVERSITY_RATIO).float()
