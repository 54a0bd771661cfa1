"""The VDM's eps-prediction network: eps_hat(z, gamma, label) around a UNet or an MLP."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.models import MLP, UNet
from pipeline.objectives.vdm.config import VDMConfig


def _fourier(x: torch.Tensor, dim: int, min_freq: float, max_freq: float) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, device=x.device))
    a = x.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], dim=1)


class Denoiser(nn.Module):
    """eps_hat(z, gamma, label): wraps a network with noise-level and label embeddings.

    The noise level enters as gamma (not time), so a schedule change with the same
    endpoints leaves the model unchanged (Kingma et al. 2021 sec. 5.1). Class labels get an
    ``nn.Embedding``; real labels (temperature) Fourier features of the standardised value.
    """

    def __init__(self, net: nn.Module, emb_dim: int, meta: DataMeta):
        super().__init__()
        self.net, self.emb_dim, self.label_kind = net, emb_dim, meta.label_kind
        self.gamma_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if meta.label_kind == "class":
            if not meta.num_classes or meta.num_classes < 1:
                raise ValueError(f"label_kind 'class' needs num_classes >= 1 in DataMeta, got {meta.num_classes}")
            self.label_emb = nn.Embedding(meta.num_classes, emb_dim)
        elif meta.label_kind == "continuous":
            # Standardised by the listed values or, too many to list, the range's end points
            # (mean: the midpoint, std: half the width); [0, 1] for a manifest that has neither.
            vals = np.asarray(meta.label_values or meta.label_range or [0.0, 1.0], dtype=np.float64)
            self.label_center, self.label_scale = float(vals.mean()), float(vals.std() or 1.0)
            self.label_emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        elif meta.label_kind != "none":
            raise ValueError(f"unknown label_kind {meta.label_kind!r}; allowed: none, class, continuous")

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        gamma = gamma.expand(z.shape[0]) if gamma.dim() == 0 else gamma
        emb = self.gamma_mlp(_fourier(gamma, self.emb_dim, 1 / 16, 4.0))
        if self.label_kind == "class":
            emb = emb + self.label_emb(label.long())
        elif self.label_kind == "continuous":
            lab = (label.float().reshape(-1) - self.label_center) / self.label_scale
            emb = emb + self.label_emb(_fourier(lab, self.emb_dim, 1 / 4, 8.0))
        return self.net(z, emb)


def build_network(cfg: VDMConfig, meta: DataMeta) -> nn.Module:
    """The network inside the :class:`Denoiser`: a UNet whose convolutions match the samples'
    dimensionality ([C, L], [C, H, W], [C, D, H, W] with even spatial sizes), or an MLP.
    Which one: :meth:`VDMConfig.resolve_architecture` (also run before training starts)."""
    shape = tuple(meta.sample_shape)
    if cfg.resolve_architecture(shape) == "unet":
        return UNet(shape[0], cfg.channels, cfg.emb_dim, periodic=cfg.periodic, ndim=len(shape) - 1,
                    activation_checkpointing=cfg.activation_checkpointing)
    if cfg.activation_checkpointing:
        raise ValueError(f"vdm.activation_checkpointing=true needs the UNet; samples {shape} get the MLP "
                         "(vdm.architecture=auto), which has no blocks to checkpoint")
    return MLP(int(np.prod(shape)), cfg.mlp_hidden, cfg.mlp_layers, cfg.emb_dim)
