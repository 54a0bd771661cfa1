"""Observable matching: G's feature-matching term on a spin lattice's observables.

Which lattice observables are matched (:data:`MATCHED_OBSERVABLES`), their per-sample values
or, for Bernoulli spin output, their exact expectation over the draw
(:func:`matched_observables`), and the unbiased squared distance between the fakes' and the
reals' means per label (:func:`observable_matching`; Salimans et al. 2016, Sec. 3.1).
"""

from __future__ import annotations

import torch

from pipeline.models.gan_features import lattice_observables

# Which lattice_observables are matched: the correlations c1, c_diag, c2 and m^2 - all sums of
# products of spins, so their expectations over gan.spin_output=bernoulli's independent draws
# are exact functions of G's means (matched_observables). c1^2 and |m| are not. (Measured: at
# weight 30 this subset did slightly better than all six on two seeds, docs/model_zoo.md.)
MATCHED_OBSERVABLES = (0, 2, 3, 5)


def matched_observables(x: torch.Tensor, spin_means: bool = False) -> torch.Tensor:
    """[B, 1, H, W] lattices -> [B, 4]: c1, c_diag, c2 and m^2 (MATCHED_OBSERVABLES of
    lattice_observables). ``spin_means``: x holds the means y of independent +-1 spins
    (gan.spin_output=bernoulli) and the result is the observables' exact expectation over
    the draw: a product of distinct sites averages to the product of the means
    (E s_i s_j = y_i y_j; the lattice is periodic and > 2 sites wide, so the correlations pair
    distinct sites), and m^2 adds its i = j terms, s_i^2 = 1: E m^2 = m(y)^2 + (1 - mean y^2) / N.
    Differentiating this expectation instead of the drawn lattice's observables through the
    straight-through estimator is Rao-Blackwellisation: no draw noise, and no bias from m^2's
    i = j terms, whose straight-through gradient 2 s_i has mean 2 y_i where the exact one is 0
    (it shrinks |y| - more disordered lattices - the more weight the matching has)."""
    obs = lattice_observables(x)[:, MATCHED_OBSERVABLES]
    if not spin_means:
        return obs
    assert min(x.shape[2:]) > 2, "distance-2 correlations of a lattice <= 2 wide pair a site with itself"
    n_sites = x.shape[2] * x.shape[3]
    m2 = obs[:, 3] + (1.0 - (x * x).mean(dim=(1, 2, 3))) / n_sites
    return torch.cat([obs[:, :3], m2[:, None]], dim=1)


def observable_matching(fake_obs: torch.Tensor, real_obs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per label in the batch (all samples if ``labels`` is None), an unbiased estimate of
    ||E obs(fake) - E obs(real)||^2 from per-sample observables [B, k] (matched_observables):
    the squared MMD with a linear kernel (Gretton et al. 2012, eq. 3), sums over pairs
    i != j only, weighted by the label's share of the batch; labels with fewer than 2 samples
    add nothing. The plain squared gap of the batch means would add Var(mean of the fakes)
    and so reward G for shrinking its observables' fluctuations (the specific heat and
    susceptibility) by O(1/group size). Fakes and reals are paired by label (the fakes are
    drawn with the real batch's labels). Computed on each rank's share of the batch: being
    quadratic in the samples, it is not split-invariant, so 2 ranks x B train close to, not
    exactly like, 1 process x 2B."""
    assert fake_obs.shape == real_obs.shape and fake_obs.dim() == 2, (fake_obs.shape, real_obs.shape)
    f, r = fake_obs, real_obs
    groups = [torch.ones(len(f), dtype=torch.bool, device=f.device)] if labels is None else \
        [labels == value for value in labels.unique()]
    total = torch.zeros((), device=f.device)
    for sel in groups:
        n = int(sel.sum())
        if n < 2:
            continue
        fs, rs = f[sel], r[sel]

        def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # mean over i != j of a_i . b_j
            return ((a.sum(0) * b.sum(0)).sum() - (a * b).sum()) / (n * (n - 1))

        mmd2 = pairs(fs, fs) + pairs(rs, rs) - 2 * pairs(fs, rs)
        total = total + (n / len(f)) * mmd2
    return total
