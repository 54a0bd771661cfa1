"""A small UNet for lattices, with circular padding for periodic boundary conditions.

Periodic lattices (Ising, XY, lattice field theory) have no edges: circular padding makes
every convolution translation-equivariant on the torus, so the network cannot tell where
the boundary of the stored array is. One down-sampling level is enough for 16x16 to 64x64
lattices at the model sizes a CPU can train; conditioning (noise level, label) enters each
residual block as a per-channel scale and shift (FiLM, as in DDPM/EDM UNets).

The same network serves samples [C, L], [C, H, W] and [C, D, H, W] (``ndim`` = 1, 2, 3):
the convolutions are looked up once by ``ndim`` and everything else (GroupNorm, FiLM) does
not depend on the number of spatial dimensions. With circular padding the stride-2
down-sampling and the kernel-2 stride-2 up-sampling make the whole network equivariant to
circular shifts by a multiple of 2^levels sites along each axis (another shift moves a
down-sampling grid by part of a coarse site).

Any spatial size with zero padding (``periodic=False``, e.g. a calorimeter's 45 x 16 x 9
voxels): the input is extended by zeros at the far end of each axis to the next multiple of
2^levels and the output cropped back. The first convolution sees there the zeros its own
padding would give; deeper ones see the padded sites' activations, so the network acts on a
slightly larger box (sizes that need no padding are unchanged). A periodic lattice cannot be
extended that way (a torus of another size is another lattice), so circular padding needs
every size a multiple of 2^levels.

``levels`` > 1 adds down-sampling levels below the first (2 * channels wide each). Why: the
convolutions of one level reach 12 sites from each output (tests/unit/test_unet_levels.py),
so the modes of the box's largest wavelengths (k = 0 and the first shells of a 32^2 periodic
field) are out of their reach and the samples' power there stays off (docs/model_zoo.md,
grf2d); each added level doubles the reach of the blocks below it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.conv_nd import CONVS


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def _convs(ndim: int) -> tuple[type[nn.Module], type[nn.Module]]:
    if ndim not in CONVS:
        raise ValueError(f"UNet ndim must be one of {sorted(CONVS)} (spatial dimensions of a sample), got {ndim!r}")
    return CONVS[ndim]


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, padding_mode: str, ndim: int = 2):
        super().__init__()
        conv, _ = _convs(ndim)
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.skip = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        film = self.film(emb)  # [B, 2 * out_ch]
        # One scale and shift per sample and channel, broadcast over every spatial dim.
        film = film.reshape(*film.shape, *(1,) * (x.dim() - 2))
        scale, shift = film.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _Level(nn.Module):
    """One down-sampling level below the UNet's first, ``channels`` wide throughout."""

    def __init__(self, channels: int, emb_dim: int, padding_mode: str, ndim: int):
        super().__init__()
        conv, conv_transpose = _convs(ndim)
        self.down = conv(channels, channels, 3, stride=2, padding=1, padding_mode=padding_mode)
        self.enc = ResBlock(channels, channels, emb_dim, padding_mode, ndim)
        self.up = conv_transpose(channels, channels, 2, stride=2)
        self.dec = ResBlock(2 * channels, channels, emb_dim, padding_mode, ndim)


class UNet(nn.Module):
    """eps_hat = UNet(z, emb): [B, C, *S] -> [B, C, *S], conditioned on emb [B, emb_dim],
    where S is (L,), (H, W) or (D, H, W) for ``ndim`` = 1, 2 or 3.

    Levels: ``channels`` at S, ``2 * channels`` at S/2 ... S/2^levels (periodic: every spatial
    size a multiple of 2^levels; zero padding: any size, padded up to one inside forward).
    The output convolution starts at zero so the initial prediction is eps_hat = 0.
    """

    def __init__(self, in_channels: int, channels: int = 16, emb_dim: int = 64, periodic: bool = True,
                 ndim: int = 2, activation_checkpointing: bool = False, levels: int = 1):
        super().__init__()
        if in_channels < 1 or channels < 1 or levels < 1:
            raise ValueError(f"UNet needs in_channels >= 1, channels >= 1 and levels >= 1, "
                             f"got {in_channels}, {channels}, {levels}")
        self.levels = levels
        self.periodic = periodic
        conv, conv_transpose = _convs(ndim)
        self.ndim = ndim
        self.activation_checkpointing = activation_checkpointing
        pm = "circular" if periodic else "zeros"
        c, c2 = channels, 2 * channels
        # Creation order (and so the initial weights drawn from a seed) is the same in
        # every ndim and, for ndim=2, the same as before ndim existed.
        self.inp = conv(in_channels, c, 3, padding=1, padding_mode=pm)
        self.enc = ResBlock(c, c, emb_dim, pm, ndim)
        self.down = conv(c, c2, 3, stride=2, padding=1, padding_mode=pm)
        self.mid = ResBlock(c2, c2, emb_dim, pm, ndim)
        self.up = conv_transpose(c2, c, 2, stride=2)
        self.dec = ResBlock(2 * c, c, emb_dim, pm, ndim)
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = conv(c, in_channels, 3, padding=1, padding_mode=pm)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Levels below the first, created last so that levels=1 draws the same initial weights
        # from a seed as before they existed. Each: down-sample, block; up-sample, block on the
        # concatenation with its input (the U's skip).
        self.deeper = nn.ModuleList(_Level(c2, emb_dim, pm, ndim) for _ in range(levels - 1))

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        spatial = tuple(z.shape[2:])
        step = 2**self.levels
        names = {1: "[B, C, L]", 2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}[self.ndim]
        if z.dim() != self.ndim + 2:
            raise ValueError(f"UNet(ndim={self.ndim}, levels={self.levels}) needs input {names}, got {tuple(z.shape)}")
        if self.periodic and any(s % step for s in spatial):
            raise ValueError(f"UNet(ndim={self.ndim}, levels={self.levels}) with circular padding needs input {names} "
                             f"with every spatial size a multiple of {step} (one stride-2 down-sampling per level), "
                             f"got {tuple(z.shape)}; zero padding (periodic=False) takes any size")
        extra = [-s % step for s in spatial]
        if any(extra):
            # F.pad lists (before, after) pairs from the last axis to the first.
            z = F.pad(z, [p for e in reversed(extra) for p in (0, e)])
        out = self._unet(z, emb)
        if any(extra):
            out = out[(..., *(slice(0, s) for s in spatial))]
        return out

    def _unet(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h0 = self._block(self.enc, self.inp(z), emb)
        h = self._block(self.mid, self.down(h0), emb)
        skips = []
        for level in self.deeper:
            skips.append(h)
            h = self._block(level.enc, level.down(h), emb)
        for level in reversed(self.deeper):
            h = self._block(level.dec, torch.cat([level.up(h), skips.pop()], dim=1), emb)
        h = self._block(self.dec, torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))

    def _block(self, block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``block(x, emb)``; with activation checkpointing, its inner activations (norms, SiLUs,
        the first convolution's output) are not kept for backward but recomputed from ``x``
        there (Chen et al. 2016, "Training deep nets with sublinear memory cost"): memory for
        one extra forward of the block. Non-reentrant checkpointing (torch's recommended mode)
        works with autograd hooks (FSDP2, DeepSpeed) and inputs that need no gradient."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)
