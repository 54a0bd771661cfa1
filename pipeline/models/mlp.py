"""A residual MLP for vector-valued samples (e.g. 2-D toy distributions, observables)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """eps_hat = MLP(z, emb): [B, *shape] -> [B, *shape], conditioned on emb [B, emb_dim].

    The conditioning embedding is added to every hidden layer (residual blocks with
    LayerNorm); the output layer starts at zero so the initial prediction is eps_hat = 0.
    """

    def __init__(self, dim: int, hidden: int = 128, num_layers: int = 3, emb_dim: int = 64):
        super().__init__()
        if dim < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(f"MLP needs dim, hidden, num_layers >= 1, got {dim}, {hidden}, {num_layers}")
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.inp(z.flatten(1))
        for norm, lin, e in zip(self.norms, self.layers, self.emb):
            h = h + lin(F.silu(norm(h) + e(emb)))
        return self.out(F.silu(h)).view_as(z)
