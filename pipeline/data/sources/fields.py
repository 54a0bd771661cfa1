"""Lattice fields from physics: Gaussian random fields (:mod:`pipeline.physics.grf`) and
scalar phi^4 theory by HMC (:mod:`pipeline.physics.phi4`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.data.meta import DataMeta
from pipeline.data.sources.base import SourceData, derived_seed


def grf(field, num_samples: int, *, seed: int) -> SourceData:
    """``num_samples`` Gaussian random fields ``field`` (a ``pipeline.physics.grf.GRF``),
    channel-first float32 [C, L] / [C, L, L] / [C, L, L, L], drawn with seed
    ``SeedSequence([seed, 1])``. The manifest's info records the field (enough to rebuild its
    exact spectrum with ``grf_from_info``); when the density is non-degenerate each sample's
    exact log-likelihood (of the stored float32 values) goes in its json and the mean NLL in
    nats per dimension in the info."""
    if num_samples < 1:
        raise ValueError(f"grf: --num-samples must be >= 1, got {num_samples}")
    derived = derived_seed(seed, 1)
    rng = np.random.default_rng(derived)
    # Drawn in fixed chunks to bound the float64 temporaries; the chunking is fixed, so the
    # output depends only on the seed.
    chunk = 256
    x = np.concatenate([
        field.sample(min(chunk, num_samples - start), rng).astype(np.float32)
        for start in range(0, num_samples, chunk)
    ])
    info: dict[str, Any] = {"grf": field.info(), "seed": seed, "derived_seed": derived}
    json_columns: dict[str, np.ndarray] = {}
    if np.all(field.power_half() > 0):
        log_lik = np.concatenate([field.log_density(x[s:s + chunk]) for s in range(0, num_samples, chunk)])
        json_columns["log_likelihood"] = log_lik
        info["nll_nats_per_dim"] = float(-log_lik.mean() / (field.channels * field.num_sites))
    return SourceData(
        x=x,
        meta=DataMeta(sample_shape=field.shape, data_kind="continuous", boundary="periodic"),
        json_columns=json_columns,
        info=info,
    )


def phi4(theory, num_samples: int, hmc, *, seed: int) -> SourceData:
    """``num_samples`` configurations of ``theory`` (a ``pipeline.physics.phi4.Phi4``)
    sampled by HMC with settings ``hmc`` from seed ``SeedSequence([seed, 1])``, stored
    float32 [1, L, L] (periodic). Each sample's json has kappa, lam, its chain and trajectory;
    the manifest's info the theory, the sampler's acceptance, the integrated autocorrelation
    time of |M| and the thinning it chose, and at lam = 0 the exact free-field values."""
    from pipeline.physics import phi4 as phi4_mod

    if num_samples < 1:
        raise ValueError(f"phi4: --num-samples must be >= 1, got {num_samples}")
    result = phi4_mod.sample(theory, num_samples, hmc, np.random.default_rng(derived_seed(seed, 1)))
    return SourceData(
        x=result.configs.astype(np.float32)[:, None],
        meta=DataMeta(sample_shape=(1, theory.size, theory.size), data_kind="continuous", boundary="periodic"),
        json_columns={"kappa": np.full(num_samples, theory.kappa), "lam": np.full(num_samples, theory.lam),
                      "chain": result.chain.astype(np.int64), "trajectory": result.trajectory.astype(np.int64)},
        info={**phi4_mod.info(theory, hmc, result), "seed": seed},
    )
