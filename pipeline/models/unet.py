"""A small UNet for lattices, with circular padding for periodic boundary conditions.

Periodic lattices (Ising, XY, lattice field theory) have no edges: circular padding makes
every convolution translation-equivariant on the torus, so the network cannot tell where
the boundary of the stored array is. One down-sampling level is enough for 16x16 to 64x64
lattices at the model sizes a CPU can train; conditioning (noise level, label) enters each
residual block as a per-channel scale and shift (FiLM, as in DDPM/EDM UNets).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, padding_mode: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """eps_hat = UNet(z, emb): [B, C, H, W] -> [B, C, H, W], conditioned on emb [B, emb_dim].

    Levels: ``channels`` at H x W, ``2 * channels`` at H/2 x W/2 (H and W must be even).
    The output convolution starts at zero so the initial prediction is eps_hat = 0.
    """

    def __init__(self, in_channels: int, channels: int = 16, emb_dim: int = 64, periodic: bool = True):
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"UNet needs in_channels >= 1 and channels >= 1, got {in_channels}, {channels}")
        pm = "circular" if periodic else "zeros"
        c, c2 = channels, 2 * channels
        self.inp = nn.Conv2d(in_channels, c, 3, padding=1, padding_mode=pm)
        self.enc = ResBlock(c, c, emb_dim, pm)
        self.down = nn.Conv2d(c, c2, 3, stride=2, padding=1, padding_mode=pm)
        self.mid = ResBlock(c2, c2, emb_dim, pm)
        self.up = nn.ConvTranspose2d(c2, c, 2, stride=2)
        self.dec = ResBlock(2 * c, c, emb_dim, pm)
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1, padding_mode=pm)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[-1] % 2 or z.shape[-2] % 2:
            raise ValueError(f"UNet needs input [B, C, H, W] with even H and W, got {tuple(z.shape)}")
        h0 = self.enc(self.inp(z), emb)
        h = self.mid(self.down(h0), emb)
        h = self.dec(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))
