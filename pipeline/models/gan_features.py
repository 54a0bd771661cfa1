"""What a GAN discriminator reads besides its own layers' features: a spin lattice's
observables (:func:`lattice_observables`), a periodic field's Fourier amplitudes per |k| shell
(:func:`spectral_amplitudes`), and the minibatch standard deviation (:class:`MinibatchStd`).
The networks that use them: :mod:`pipeline.models.gan_nets`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NUM_LATTICE_OBSERVABLES = 6


def lattice_observables(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] spins (or G's tanh output) on a periodic lattice -> [B, 6] per-lattice
    densities: nearest-neighbour correlation c1 = <s_i s_j>_nn (energy per spin = -2 c1 for
    J = 1), c1^2, the next-nearest (diagonal) and distance-2 axial correlations, |m| and m^2.
    Differentiable in x, so G's gradient through D reaches them."""
    assert x.dim() == 4 and x.shape[1] == 1, f"lattice_observables needs [B, 1, H, W], got {tuple(x.shape)}"

    def corr(dy: int, dx: int) -> torch.Tensor:
        return (x * torch.roll(x, shifts=(dy, dx), dims=(2, 3))).mean(dim=(1, 2, 3))

    c1 = 0.5 * (corr(1, 0) + corr(0, 1))
    c_diag = 0.5 * (corr(1, 1) + corr(1, -1))
    c2 = 0.5 * (corr(2, 0) + corr(0, 2))
    m = x.mean(dim=(1, 2, 3))
    return torch.stack([c1, c1 * c1, c_diag, c2, m.abs(), m * m], dim=1)


def shell_matrix(spatial: tuple[int, ...]) -> torch.Tensor:
    """[prod(spatial), S]: averages a flattened map over the full FFT grid within each
    wavevector shell round(|m|) = 0 .. S - 1 (m_j integer, in ``fftfreq`` order per axis)."""
    axes = [torch.fft.fftfreq(n, 1.0 / n) for n in spatial]
    m = torch.stack(torch.meshgrid(*axes, indexing="ij")).double()
    shell = m.pow(2).sum(0).sqrt().round().long().flatten()
    one_hot = torch.nn.functional.one_hot(shell).double()
    return (one_hot / one_hot.sum(0)).float()


def spectral_amplitudes(x: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] periodic fields -> [B, C * S]: the mean Fourier amplitude |x_hat(k)| /
    sqrt(V) over each shell of |k|. Amplitudes, not powers: each is 1-Lipschitz in x (|x_hat(k)|
    <= sum |x| <= sqrt(V) ||x||), so a critic reading them stays Lipschitz, which WGAN-GP's
    critic must be (quadratic features of unbounded fields let it diverge); invariant under
    every lattice translation. k = 0 is |M| sqrt(V)."""
    spatial = tuple(range(2, x.dim()))
    volume = math.prod(x.shape[2:])
    amp = torch.fft.fftn(x.float(), dim=spatial).abs() / math.sqrt(volume)
    return (amp.flatten(2) @ shells).flatten(1)


class MinibatchStd(nn.Module):
    """Appends one feature: the standard deviation of each input feature over a group of
    ``group_size`` consecutive samples, averaged over the features, the same value for every
    sample of the group (Karras et al. 2018, ProGAN Sec. 3; StyleGAN2's MinibatchStdLayer
    with one channel). A per-sample critic sees the spread of a lattice-wide quantity such as
    the magnetisation only through each sample's value; with this feature D compares the
    spread of its features within a batch of fakes with that within a batch of reals.

    Groups are consecutive (StyleGAN's are strided), so that in D's one forward on [real,
    fake, interpolates] a group never mixes parts when ``group_size`` divides the batch
    (Config.validate checks that against data.batch_per_rank)."""

    def __init__(self, group_size: int):
        super().__init__()
        assert group_size >= 2, group_size  # GANConfig.validate
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, f = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"the minibatch standard deviation needs the batch ({n} samples) to be a multiple "
                             f"of its group size {g} (gan.d_minibatch_std)")
        y = x.float().reshape(n // g, g, f)
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt()  # [n // g, f]
        return torch.cat([x, std.mean(dim=1).repeat_interleave(g)[:, None].to(x.dtype)], dim=1)
