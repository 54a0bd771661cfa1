"""The data batches ``pipeline bench variance`` measures on, and their exact references: each
batch's exact negative ELBO (every diffusion term evaluated), the data variance and the noise
floor that no time-step sampler can go below (:mod:`pipeline.bench.variance` explains the
design)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.eval.elbo import exact_elbo
from pipeline.objectives.vdm import VDM


def keyed_generator(*key: int) -> torch.Generator:
    """An independent generator for each (purpose, index, ...) key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@dataclass
class EvalBatch:
    """One fixed batch and its exact negative ELBO (bits/dim)."""

    x: torch.Tensor  # data space, as stored
    labels: torch.Tensor | None
    exact_bpd: float
    exact_stderr_bpd: float  # Monte-Carlo standard error of exact_bpd
    exact_per_sample_bpd: torch.Tensor  # [B]
    term_noise_var: torch.Tensor  # [B, num_terms] variance of one noise draw of each term, (bits/dim)^2
    recon_noise_var: torch.Tensor  # [B] the same for the reconstruction term
    term_mean: torch.Tensor  # [B, num_terms] each term's mean over the exact evaluator's draws, bits/dim
    term_uniform_prob: torch.Tensor  # [num_terms] the probability uniform t gives each term
    num_noise_samples: int  # draws behind each term_mean


def exact_batches(
    module: VDM,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_batches: int,
    batch_size: int,
    seed: int,
    num_noise_samples: int = 4,
    num_quadrature_points: int = 64,
) -> list[EvalBatch]:
    """``num_batches`` batches drawn without replacement from ``x`` (independently of each
    other), each with its exact negative ELBO."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    if x.shape[0] < batch_size:
        raise ValueError(f"the data has {x.shape[0]} samples, fewer than batch_size={batch_size}")
    rng = np.random.default_rng([seed, 1])
    g = keyed_generator(seed, 2)
    out = []
    for _ in range(num_batches):
        idx = torch.from_numpy(rng.choice(x.shape[0], batch_size, replace=False))
        xb, lb = x[idx], labels[idx] if labels is not None else None
        ex = exact_elbo(module, xb, lb, num_noise_samples=num_noise_samples,
                        num_quadrature_points=num_quadrature_points, generator=g)
        out.append(EvalBatch(xb, lb, ex["bits_per_dim"], ex["stderr_bpd"], ex["per_sample_bpd"].double(),
                             ex["term_noise_var_bpd"].double(), ex["recon_noise_var_bpd"].double(),
                             ex["term_mean_bpd"].double(), ex["term_uniform_prob"].double(), num_noise_samples))
    return out


def noise_floor(batches: list[EvalBatch]) -> float:
    """The least E_x Var(estimate | batch) any time-step sampler can reach at this cost: the
    variance the noise eps leaves inside each term.

    An estimate (1/B) sum_i L_{t_i}(x_i, eps_i) / p_t, with each sample's t_i marginally ~ p
    (stratified or not) and eps_i independent of the t's, has E_x Var(. | batch) >=
    (1/B) sum_t v_t / p_t, v_t = E_x Var_eps L_t(x, eps) (conditioning on every t_i removes
    only the part due to the choice of t). Over all proposals p the least value is
    (1/B) (sum_t sqrt(v_t))^2 (Cauchy-Schwarz, at p_t ~ sqrt(v_t)); the reconstruction term's
    own noise adds (1/B) E_x Var_eps. For continuous time the terms are the quadrature nodes'
    weighted contributions, and the sum approximates (int sqrt(Var_eps L(gamma)) dgamma)^2.
    ``v_t`` comes from the exact evaluator's noise draws (denoising-matching form)."""
    B = batches[0].x.shape[0]
    v = torch.cat([b.term_noise_var for b in batches]).mean(0)
    recon = float(torch.cat([b.recon_noise_var for b in batches]).mean())
    return (float(v.clamp(min=0).sqrt().sum()) ** 2 + recon) / B


def uniform_variance(batches: list[EvalBatch]) -> float:
    """E_x Var(estimate | batch) of the uniform sampler, computed from the exact evaluator's
    per-term figures instead of measured by drawing t: its draws are heavy-tailed (a few terms
    carry most of the second moment), so a measured variance, and every ratio over it, moves
    by ~20 % between runs of the bench's size.

    Sample i's estimate picks term j with probability p_j and returns L_j / p_j, plus the
    reconstruction term's one draw, so Var_i = Var_eps(recon) + sum_j (m_ij^2 + v_ij) / p_j -
    (sum_j m_ij)^2 with m_ij the term's mean and v_ij one draw's variance; the batch mean of B
    independent samples has (1 / B^2) sum_i Var_i. m_ij is known as an average over S draws,
    whose square is m^2 + v / S in expectation: that excess is taken off both squares. In
    continuous time the terms are the quadrature nodes and p_j their weights: this is uniform
    gamma between the endpoints (``uniform`` of a linear schedule, ``uniform-linear`` of any
    other), as the quadrature resolves it."""
    per_batch = []
    for b in batches:
        m, v, p, S = b.term_mean, b.term_noise_var, b.term_uniform_prob, b.num_noise_samples
        second = ((m**2 - v / S + v) / p).sum(1)
        first_sq = m.sum(1) ** 2 - v.sum(1) / S
        per_batch.append(float((b.recon_noise_var + second - first_sq).sum()) / m.shape[0] ** 2)
    return float(np.mean(per_batch))


def data_variance(batches: list[EvalBatch]) -> float:
    """Var over random batches of the batch's mean -ELBO: Var_x(-ELBO(x)) / B.

    The exact per-sample values carry Monte-Carlo noise whose mean variance is B x the
    squared standard error of the batch mean; it is subtracted so that only the data's
    spread remains."""
    per_batch = []
    for b in batches:
        v = b.exact_per_sample_bpd
        n = v.numel()
        per_batch.append((float(v.var(unbiased=True)) - n * b.exact_stderr_bpd**2) / n)
    return float(np.mean(per_batch))


def load_pool(run_dir: Path, info: dict, data: str | None) -> tuple[torch.Tensor, torch.Tensor | None, str, str]:
    """The held-out samples (and labels) to measure on: ``data`` or the run's train_urls,
    validation split when the set has one."""
    from pipeline.eval.reference import has_split, load_reference

    from pipeline.eval.common import run_data

    data_cfg = info["config"].get("data") or {}
    urls = run_data(run_dir, info, data)
    split = "validation" if has_split(urls, "validation") else "all"
    ref = load_reference(urls, split=split)
    meta = info["meta"]
    if tuple(ref.meta.sample_shape) != tuple(meta["sample_shape"]):
        raise ConfigError(f"--data {urls}: samples of shape {tuple(ref.meta.sample_shape)}, the model was trained on "
                          f"{tuple(meta['sample_shape'])}")
    x = torch.from_numpy(ref.x)
    kind = meta.get("label_kind", "none")
    if kind == "none":
        return x, None, urls, split
    if kind == "class":
        if ref.cls is None:
            raise ConfigError(f"{urls}: the model is class-conditional but the samples carry no class")
        return x, torch.from_numpy(ref.cls), urls, split
    key = data_cfg.get("label_key") or "temperature"
    col = ref.json_column(key)
    if col is None:
        raise ConfigError(f"{urls}: the model is conditioned on {key!r} but the samples carry no numeric json {key!r}")
    return x, torch.from_numpy(col).float(), urls, split
