"""2D Ising lattices at one or several temperatures (Monte Carlo: :mod:`pipeline.physics.ising`)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.data.meta import DataMeta
from pipeline.data.sources.base import SourceData, derived_seed


def _ising_one(args: tuple[float, int, int, int]) -> np.ndarray:
    # Imported lazily: the physics module is heavy-ish and only this source needs it.
    from pipeline.physics.ising import sample_ising

    temperature, size, num_samples, seed = args
    return sample_ising(temperature, size, num_samples, seed=seed)


def ising(
    temperatures: list[float], size: int, num_samples: int, *, seed: int, workers: int = 1
) -> SourceData:
    """``num_samples`` equilibrium L x L lattices per temperature, stored channel-first int8
    [1, L, L] with values +1/-1. Temperature ``t_i`` uses seed ``SeedSequence([seed, i])``."""
    if not temperatures:
        raise ValueError("ising: give at least one --temperature")
    if any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise ValueError(f"ising: temperatures must be finite and > 0, got {temperatures}")
    if len(set(temperatures)) != len(temperatures):
        raise ValueError(f"ising: temperatures must be distinct, got {temperatures}")
    if size < 2:
        raise ValueError(f"ising: --size must be >= 2, got {size}")
    if num_samples < 1:
        raise ValueError(f"ising: --num-samples must be >= 1, got {num_samples}")
    seeds = [derived_seed(seed, i) for i in range(len(temperatures))]
    jobs = [(float(t), size, num_samples, s) for t, s in zip(temperatures, seeds)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            lattices = list(pool.map(_ising_one, jobs))
    else:
        lattices = [_ising_one(j) for j in jobs]
    for t, lat in zip(temperatures, lattices):
        if lat.shape != (num_samples, size, size) or not np.isin(lat, (-1, 1)).all():
            raise RuntimeError(f"sample_ising({t}, {size}, {num_samples}) returned a wrong array")
    x = np.concatenate(lattices).astype(np.int8)[:, None]  # [N, 1, L, L], channel-first
    n_t = len(temperatures)
    several = n_t > 1
    meta = DataMeta(
        sample_shape=(1, size, size),
        data_kind="spins",
        label_kind="continuous" if several else "none",
        label_values=tuple(sorted(float(t) for t in temperatures)) if several else None,
    )
    return SourceData(
        x=x,
        meta=meta,
        json_columns={
            "temperature": np.repeat(np.asarray(temperatures, dtype=np.float64), num_samples),
            "size": np.full(n_t * num_samples, size, dtype=np.int64),
            "seed": np.repeat(np.asarray(seeds, dtype=np.int64), num_samples),
        },
        info={"temperatures": [float(t) for t in temperatures], "seeds": seeds},
    )
