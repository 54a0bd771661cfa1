"""The GAN's random draws: latents, Bernoulli spins, interpolation weights, the SSL split.

:class:`_Noise` is one call's noise source: each rank's own RNG, or (gan.latent_seed) a
generator keyed by (seed, phase, step, call) from which the whole global batch's noise is
drawn and each rank takes its slice, so that 2 ranks x B draw what 1 process x 2B draws.
Also the latent prior (:func:`sample_latent`), the spin draw given G's means
(:func:`_draw_spins`) and the content-keyed labelled / held-out split of semi-supervised
training (:func:`_content_uniform`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _draw_spins(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """+-1 spins with mean y: +1 where u < (1 + y) / 2, for u ~ U(0, 1) of y's shape."""
    return torch.where(u < (1.0 + y.float()) / 2.0, 1.0, -1.0).to(y.dtype)



def sample_latent(num_samples: int, latent_dim: int, prior: str, device: torch.device | str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """h ~ U(-1, 1)^d (the seed's prior) or N(0, I). Drawn on the generator's device (CPU
    generators are how samplers make seeded draws) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    if prior == "uniform":
        h = torch.rand(num_samples, latent_dim, device=gen_device, generator=generator) * 2.0 - 1.0
    elif prior == "normal":
        h = torch.randn(num_samples, latent_dim, device=gen_device, generator=generator)
    else:
        raise ValueError(f"latent prior must be 'uniform' or 'normal', got {prior!r}")
    return h.to(device)



def _content_uniform(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """A per-sample number in [0, 1) that is a fixed function of the sample's content.

    Decides which samples are labelled / held out in semi-supervised training. A function of
    the content (not of the position in the batch) keeps the split the same for a sample
    across epochs, shuffles, ranks and resumes without needing sample ids from the stream:
    frac(<x, w>) with w a fixed pseudo-random vector, in float64 so that identical inputs
    give identical fractions.
    """
    flat = x.detach().flatten(1).to(torch.float64)
    key = (flat.shape[1], flat.device)
    if key not in cache:
        g = torch.Generator().manual_seed(20160610)  # fixed: the split must never change
        cache[key] = (torch.rand(flat.shape[1], generator=g, dtype=torch.float64) * 97.0 + 3.0).to(flat.device)
    v = flat @ cache[key]
    return torch.frac(v.abs())


@dataclass
class _Noise:
    """A generator for one call's noise (None: the global RNG) and this rank's place in the
    global batch: noise for ``world_size * n`` samples is drawn, rank ``r`` uses rows
    ``[r * n, (r + 1) * n)``, the same rows its data occupy in the global batch's gradient mean."""

    generator: torch.Generator | None
    rank: int
    world_size: int

    def slice(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.rank * n:(self.rank + 1) * n]


    @classmethod
    def keyed(cls, key: list[int], rank: int, world_size: int) -> "_Noise":
        """The noise source of the call identified by ``key`` (gan.latent_seed, phase, step,
        call within the step): the same generator on every rank and every resume."""
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
        return cls(torch.Generator().manual_seed(seed), rank, world_size)

    def latent(self, n: int, dim: int, prior: str, device: torch.device) -> torch.Tensor:
        """This rank's ``n`` latents (sample_latent), drawn on ``device`` from the rank's RNG or
        sliced from the global batch's latents drawn on the CPU from the keyed generator."""
        if self.generator is None:
            return sample_latent(n, dim, prior, device)
        return self.slice(sample_latent(n * self.world_size, dim, prior, "cpu", self.generator), n).to(device)

    def uniform(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U(0, 1) of ``shape`` (shape[0]: this rank's samples) on ``device``: drawn there in
        ``dtype`` from the rank's RNG, or sliced from the global batch's float32 draw on the
        keyed generator's device (the CPU) and then cast to ``dtype``."""
        g = self.generator
        if g is None:
            return torch.rand(shape, device=device) if dtype is None else torch.rand(shape, device=device, dtype=dtype)
        n = shape[0]
        u = self.slice(torch.rand((n * self.world_size, *shape[1:]), generator=g, device=g.device), n)
        return u.to(device) if dtype is None else u.to(device, dtype)
