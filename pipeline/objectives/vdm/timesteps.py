"""Time-step samplers for the diffusion term of a VDM.

A sampler draws, per sample, a coordinate ``u`` in [0, 1) and an importance weight ``w``
such that for any per-time loss L(u) the weighted mean of w * L(u) over the *global* batch
(all ranks, all gradient-accumulation micro steps) is an unbiased estimate of
integral_0^1 L(u) du. In continuous time u is the time itself; in discrete time with K
diffusion terms the term index is floor(u K) (every term has probability mass 1/K under
the uniform sampler, so the K-scaled term is unbiased for the sum over terms).

Samplers are ``nn.Module``s so that any state (the importance sampler's loss history) lives
in registered buffers and is checkpointed with the model. ``collect`` all-gathers each micro
step's (u, loss) pairs and ``commit`` appends them after the optimizer step, on every rank
in the same order, so the state stays identical across ranks, and the proposal is fixed
for a whole global batch whatever its split into ranks x micro steps (an elastic resume
onto another world size draws what the uninterrupted run would have).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.objectives.base import AllGather, StepContext
from pipeline.objectives.draws import AnyDraws, as_draws

TIMESTEP_SAMPLERS = ("uniform", "stratified", "importance", "importance-cv", "learned-schedule")


class TimestepSampler(nn.Module):
    """The common base: what the VDM and the benchmarks may call on any time-step sampler.

    ``forward`` draws (u, w); ``update`` feeds back the all-gathered per-sample losses after a
    step; ``metrics`` are logged per step; ``ready`` says whether the sampler draws from its
    final proposal (a stateful sampler is uniform until its history is full, so a benchmark
    warms it up first). Stateless samplers keep the no-op defaults.
    """

    def forward(
        self, batch_size: int, ctx: StepContext, device: torch.device | str = "cpu", generator: AnyDraws = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, u: torch.Tensor, losses: torch.Tensor, all_gather: AllGather) -> None:
        """Append the all-gathered (u, loss) pairs to the state now."""

    def collect(self, u: torch.Tensor, losses: torch.Tensor, all_gather: AllGather) -> None:
        """One micro step's (u, loss) pairs, all-gathered now, appended at :meth:`commit`."""

    def commit(self) -> None:
        """After the optimizer step: append what :meth:`collect` gathered, in order."""

    def metrics(self, weight: torch.Tensor) -> dict[str, float]:
        return {}

    def ready(self) -> bool:
        """True once the sampler's state (if any) is full enough to draw from its proposal."""
        return True

    def baseline(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A control variate c(u), fixed before the draw, per sample, and its integral over [0, 1):
        the estimate of the integral of L is then integral c + w (L(u) - c(u)), unbiased for any
        such c. Zero here: the plain estimate w L(u)."""
        return torch.zeros_like(u), torch.zeros((), dtype=u.dtype, device=u.device)


class UniformSampler(TimestepSampler):
    """u ~ U[0, 1) independently per sample; w = 1."""

    def forward(
        self, batch_size: int, ctx: StepContext, device: torch.device | str = "cpu", generator: AnyDraws = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = as_draws(generator).uniform(batch_size, device, torch.float32)
        return u, torch.ones(batch_size, device=device)


def stratified_uniform(
    batch_size: int, ctx: StepContext, device: torch.device | str = "cpu", generator: AnyDraws = None
) -> torch.Tensor:
    """One point per stratum of [0, 1) across the global batch (ranks x micro steps x batch).

    The global batch of N = world_size * grad_accum_steps * batch_size samples splits [0, 1)
    into N equal strata and every sample draws one uniform point inside its own stratum
    (k-diffusion's cross-rank stratified sampler is the model). Strata are assigned to
    (micro step, rank, sample) by a random permutation seeded by ``ctx.step`` alone, so it
    is identical on every rank without communication, every stratum is used exactly once,
    and each sample's u is marginally U[0, 1): the loss is unbiased even conditioned on the
    batch, while the global mean has the variance of stratified sampling.
    """
    num_slots = ctx.world_size * ctx.grad_accum_steps
    if not (0 <= ctx.rank < ctx.world_size and 0 <= ctx.micro_step < ctx.grad_accum_steps):
        raise ValueError(f"inconsistent StepContext: {ctx}")
    # slot * batch_size + i is the offset within the global batch of this micro batch's i-th
    # sample in the data stream's global layout (pipeline/data/plan.py Layout: micro step-major,
    # rank-minor), so randperm(n)[offset] gives one stratum per global position of the step,
    # whatever the split of n into ranks x micro steps. The jitter is per-rank RNG (not elastic).
    slot = ctx.micro_step * ctx.world_size + ctx.rank
    n = num_slots * batch_size
    shared = torch.Generator().manual_seed((0x9E3779B97F4A7C15 * (ctx.step + 1)) % (2**63 - 1))
    strata = torch.randperm(n, generator=shared)[slot * batch_size : (slot + 1) * batch_size]
    j = strata.to(device=device, dtype=torch.float64)
    jitter = as_draws(generator).uniform(batch_size, device, torch.float64)
    return ((j + jitter) / n).to(torch.float32).clamp_(max=1 - 2**-24)


class StratifiedSampler(TimestepSampler):
    """Cross-rank stratified u (see :func:`stratified_uniform`); w = 1."""

    def forward(self, batch_size, ctx, device="cpu", generator=None):
        u = stratified_uniform(batch_size, ctx, device, generator)
        return u, torch.ones(batch_size, device=device)


class ImportanceSampler(TimestepSampler):
    """Importance sampling of K bins with p_k proportional to sqrt(E[L_k^2]).

    This is the variance-minimising proposal for an estimator of sum_k L_k (Nichol &
    Dhariwal 2021, sec. 3.3). The history holds the last ``history`` squared losses of
    every bin (ring buffers, in registered buffers); until every bin has a full history
    the sampler is uniform. p is mixed with ``uniform_mix`` of the uniform distribution so
    no weight 1/(K p_k) can blow up. Bins are drawn by inverting the CDF of p at
    cross-rank stratified points, then u is uniform within its bin: the density of u is
    K p_k on bin k, so the weight w = 1 / (K p_k) keeps the estimate unbiased.
    """

    def __init__(self, num_bins: int, history: int = 10, uniform_mix: float = 0.1):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"importance sampler needs num_bins >= 1, got {num_bins}")
        if history < 1:
            raise ValueError(f"importance sampler needs history >= 1, got {history}")
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"importance sampler uniform_mix must be in (0, 1], got {uniform_mix}")
        self.num_bins, self.history, self.uniform_mix = num_bins, history, uniform_mix
        self.register_buffer("loss_sq", torch.zeros(num_bins, history, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_bins, dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # gathered, not yet committed

    def ready(self) -> bool:
        """True once every bin holds a full history (until then the sampler is uniform)."""
        return bool((self.count >= self.history).all())

    def probs(self) -> torch.Tensor:
        """Current bin probabilities p_k (float64, sums to 1)."""
        k = self.num_bins
        if not self.ready():
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=self.loss_sq.device)
        p = self._scores()
        if not bool(p.sum() > 0):
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=p.device)
        p = p / p.sum()
        return (1 - self.uniform_mix) * p + self.uniform_mix / k

    def _scores(self) -> torch.Tensor:
        """Unnormalised p_k from a full history: the root mean square loss."""
        return self.loss_sq.mean(1).sqrt()

    def forward(self, batch_size, ctx, device="cpu", generator=None):
        v = stratified_uniform(batch_size, ctx, device, generator).to(torch.float64)
        p = self.probs().to(device)
        cdf = torch.cumsum(p, 0)
        cdf[-1] = 1.0
        k = torch.searchsorted(cdf, v, right=True).clamp_(max=self.num_bins - 1)
        lo = cdf[k] - p[k]
        within = ((v - lo) / p[k]).clamp_(0.0, 1.0 - 1e-12)
        u = ((k + within) / self.num_bins).to(torch.float32).clamp_(max=1 - 2**-24)
        w = (1.0 / (self.num_bins * p[k])).to(torch.float32)
        return u, w

    @torch.no_grad()
    def collect(self, u: torch.Tensor, losses: torch.Tensor, all_gather: AllGather) -> None:
        self._pending.append((all_gather(u.detach().reshape(-1).float()),
                              all_gather(losses.detach().reshape(-1).to(torch.float64))))

    def commit(self) -> None:
        for u, losses in self._pending:
            self.update(u, losses, _gathered)
        self._pending.clear()

    @torch.no_grad()
    def update(self, u: torch.Tensor, losses: torch.Tensor, all_gather: AllGather) -> None:
        """Append the all-gathered (bin, L^2) pairs to the ring buffers, in gather order."""
        u = all_gather(u.detach().reshape(-1).float())
        losses = all_gather(losses.detach().reshape(-1).to(torch.float64)).to(self.loss_sq.device)
        k = (u.to(self.loss_sq.device) * self.num_bins).long().clamp_(0, self.num_bins - 1)
        finite = torch.isfinite(losses)
        k, losses = k[finite], losses[finite]
        if k.numel() == 0:
            return
        # Rank of each item among the items of its bin, in gather order (stable sort).
        order = torch.sort(k, stable=True).indices
        k_sorted = k[order]
        n_per_bin = torch.bincount(k_sorted, minlength=self.num_bins)
        first = torch.cumsum(n_per_bin, 0) - n_per_bin
        rank = torch.arange(k_sorted.numel(), device=k.device) - first[k_sorted]
        # Only the last `history` items of a bin survive; dropping the others first makes the
        # scatter free of duplicate indices, hence deterministic and identical on all ranks.
        keep = rank >= n_per_bin[k_sorted] - self.history
        kk, rr = k_sorted[keep], rank[keep]
        pos = (self.count[kk] + rr) % self.history
        self._store(kk, pos, losses[order][keep])
        self.count += n_per_bin

    def _store(self, k: torch.Tensor, pos: torch.Tensor, losses: torch.Tensor) -> None:
        """Write the kept losses into slot ``pos`` of bin ``k``'s ring buffer."""
        self.loss_sq[k, pos] = losses**2

    @torch.no_grad()
    def history_checksum(self) -> float:
        """A float64 fingerprint of the loss history, position-weighted so that a reordering shows.

        Logged every step (see :meth:`metrics`): the loop averages metrics over ranks, and a
        mean of per-rank checksums equals rank 0's own (the checkpointed one) only when the
        ranks agree, which makes cross-rank drift of this state visible in the logs.
        """
        pos = torch.arange(1, self.loss_sq.numel() + 1, dtype=torch.float64, device=self.loss_sq.device)
        return float((self.loss_sq.reshape(-1) * pos).sum() / pos.numel())

    def metrics(self, weight: torch.Tensor) -> dict[str, float]:
        """ESS of this batch's weights; readiness and a fingerprint of the state that drew them."""
        w = weight.detach().double()
        ess = float(w.sum() ** 2 / (w**2).sum() / w.numel())
        return {
            "sampler_ess": ess,
            "sampler_ready": float(self.ready()),
            "sampler_history_checksum": self.history_checksum(),
            "sampler_history_count": float(self.count.sum()),
        }


class ControlVariateImportanceSampler(ImportanceSampler):
    """Importance sampling of the bins around a per-bin baseline: a control variate built from
    the same loss history (Owen 2013, "Monte Carlo theory, methods and examples", sec. 8.9).

    Why: with p_k ~ sqrt(E[L_k^2]) the estimate still carries the spread of the bins' means:
    its variance is (sum_k sqrt(m_k^2 + v_k))^2 - (sum_k m_k)^2 (in units of 1/K^2), above the
    (sum_k sqrt(v_k))^2 that the noise inside each bin leaves (``pipeline bench variance``'s
    floor). Subtracting a baseline b_k near m_k from each draw and adding back its exact
    integral sum_k b_k / K removes that spread: the estimate is sum_k b_k / K + w (L(u) -
    b_k(u)), unbiased because b is fixed before the draw (the history is appended after the
    optimizer step), and p_k ~ the residual's rms, sqrt(E[(L_k - b_k)^2]), mixed with
    ``uniform_mix`` of uniform. b_k and the residual's mean square are the history's per-bin
    mean and mean square about it, each averaged over the ``SMOOTH_BINS`` neighbouring bins on
    either side (the loss varies smoothly with t): from one bin's 10 losses the proposal is
    too noisy (measured on the continuous-time bench preset: 41x without the averaging, 66-69x
    with it, importance 45-48x, the ceiling 68.5x; docs/benchmarks.md). The baseline does not
    depend on the weights, so the gradient is importance sampling's under this proposal; what
    falls is the variance of the ELBO estimate. Until every bin's history is full it is the
    uniform sampler with a zero baseline."""

    SMOOTH_BINS = 2

    def __init__(self, num_bins: int, history: int = 10, uniform_mix: float = 0.1):
        super().__init__(num_bins, history, uniform_mix)
        self.register_buffer("loss", torch.zeros(num_bins, history, dtype=torch.float64))

    def _store(self, k: torch.Tensor, pos: torch.Tensor, losses: torch.Tensor) -> None:
        super()._store(k, pos, losses)
        self.loss[k, pos] = losses

    def _smooth(self, a: torch.Tensor) -> torch.Tensor:
        """Each bin's value averaged with its SMOOTH_BINS neighbours on either side (the edge
        bins' values repeated beyond the ends)."""
        n = min(self.SMOOTH_BINS, self.num_bins - 1)
        if n == 0:
            return a
        padded = torch.cat([a[:1].expand(n), a, a[-1:].expand(n)])
        return padded.unfold(0, 2 * n + 1, 1).mean(1)

    def bin_baselines(self) -> torch.Tensor:
        """b_k (float64); zero until every bin's history is full."""
        if not self.ready():
            return torch.zeros(self.num_bins, dtype=torch.float64, device=self.loss.device)
        return self._smooth(self.loss.mean(1))

    def _scores(self) -> torch.Tensor:
        """The residual's rms about the baseline, smoothed like it."""
        residual_sq = self._smooth(((self.loss - self.bin_baselines()[:, None]) ** 2).mean(1))
        return residual_sq.clamp_min(0.0).sqrt()

    def baseline(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.bin_baselines().to(u.device)
        k = (u.detach() * self.num_bins).long().clamp_(0, self.num_bins - 1)
        return b[k].to(u.dtype), b.mean().to(u.dtype)


def _gathered(t: torch.Tensor) -> torch.Tensor:
    return t


def build_timestep_sampler(name: str, num_bins: int, history: int = 10, uniform_mix: float = 0.1) -> TimestepSampler:
    """``learned-schedule`` draws stratified u; the VDM maps it through a learned time map."""
    if name == "uniform":
        return UniformSampler()
    if name in ("stratified", "learned-schedule"):
        return StratifiedSampler()
    if name == "importance":
        return ImportanceSampler(num_bins, history, uniform_mix)
    if name == "importance-cv":
        return ControlVariateImportanceSampler(num_bins, history, uniform_mix)
    raise ValueError(f"unknown timestep sampler {name!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")
