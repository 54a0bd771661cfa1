"""The VDM's eps-prediction network: eps_hat(z, gamma, label) around a UNet or an MLP."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.models import MLP, UNet
from pipeline.models.embedding import LabelEmbedding, fourier_features, label_standardisation
from pipeline.objectives.vdm.config import VDMConfig


class Denoiser(nn.Module):
    """eps_hat(z, gamma, label): wraps a network with noise-level and label embeddings.

    The noise level enters as gamma (not time), so a schedule change with the same
    endpoints leaves the model unchanged (Kingma et al. 2021 sec. 5.1). Labels go through the
    shared :class:`~pipeline.models.embedding.LabelEmbedding` (continuous ones as Fourier
    features of the standardised value), added to the noise-level embedding.

    ``skip``: a :class:`GaussianSkip`, eps_hat = skip(z, gamma) + net(...): the network learns the
    correction to the Gaussian answer.
    """

    def __init__(self, net: nn.Module, emb_dim: int, meta: DataMeta, skip: "GaussianSkip | None" = None):
        super().__init__()
        self.net, self.emb_dim, self.label_kind = net, emb_dim, meta.label_kind
        self.skip = skip
        self.gamma_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if meta.label_kind in ("class", "continuous"):
            mean, std = label_standardisation(meta.label_values, meta.label_range)
            self.label_emb = LabelEmbedding(meta.label_kind, emb_dim, meta.num_classes, mean, std, features="fourier")
        elif meta.label_kind != "none":
            raise ValueError(f"unknown label_kind {meta.label_kind!r}; allowed: none, class, continuous")
        self.register_load_state_dict_pre_hook(_before_shared_label_embedding)

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        gamma = gamma.expand(z.shape[0]) if gamma.dim() == 0 else gamma
        emb = self.gamma_mlp(fourier_features(gamma, self.emb_dim, 1 / 16, 4.0))
        if self.label_kind != "none":
            emb = emb + self.label_emb(label)
        out = self.net(z, emb)
        return out + self.skip(z, gamma) if self.skip is not None else out


class GaussianSkip(nn.Module):
    """E[eps | z] = sigma (z - alpha mu) / (alpha^2 v + sigma^2) per value: the exact denoiser of
    data with independent Gaussian values of mean mu and variance v (z = alpha x + sigma eps,
    alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)). The network beside it learns the
    correction, as in Karras et al. 2022's preconditioning (c_skip, sec. 5 and App. B.6), here
    with the data's own moments: without it a network narrower than the data (an MLP with fewer
    hidden units than the sample has values) cannot output eps_hat ~ z at high noise, and the
    ancestral sampler, which divides the error by alpha, diverges; a value that is nearly
    constant (an empty calorimeter voxel) is then denoised exactly at every noise level.

    mu and v are the model-space data's moments over every sample trained on so far (float64
    sums, gathered over ranks by :meth:`VDM.after_micro_step`, so identical on every rank and
    checkpointed with the model); before any data, mu = 0 and v = 1."""

    MIN_VAR = 1e-6  # a constant value still gets a finite ratio at the lowest noise

    def __init__(self, sample_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sums", torch.zeros((2,) + tuple(sample_shape), dtype=torch.float64))

    def add(self, sums: torch.Tensor, count: torch.Tensor) -> None:
        """Add sum(x), sum(x^2) over ``count`` more samples (``sums``: [2, *sample_shape])."""
        self.sums += sums.to(self.sums)
        self.count += count.to(self.count)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) per value; (0, 1) before any data (no host sync: a where, not an if)."""
        seen = self.count > 0
        n = self.count.clamp_min(1.0)
        mean = self.sums[0] / n
        var = (self.sums[1] / n - mean**2).clamp_min(self.MIN_VAR)
        return torch.where(seen, mean, torch.zeros_like(mean)), torch.where(seen, var, torch.ones_like(var))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        mean, var = (m.to(z.dtype) for m in self.moments())
        g = gamma.to(z.dtype).reshape((-1,) + (1,) * (z.dim() - 1))
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        return sigma * (z - alpha * mean) / (alpha**2 * var + sigma**2)


def _before_shared_label_embedding(module, state_dict, prefix, *args) -> None:
    """Checkpoints and exports written before the VDM used the shared LabelEmbedding name its
    layers ``label_emb.weight`` / ``label_emb.0.weight``; they are now ``label_emb.embed.*``."""
    old = prefix + "label_emb."
    for key in [k for k in state_dict if k.startswith(old) and not k.startswith(old + "embed.")]:
        state_dict[old + "embed." + key[len(old):]] = state_dict.pop(key)


def build_network(cfg: VDMConfig, meta: DataMeta) -> nn.Module:
    """The network inside the :class:`Denoiser`: a UNet whose convolutions match the samples'
    dimensionality ([C, L], [C, H, W], [C, D, H, W]; periodic ones with even spatial sizes), or an MLP.
    Which one: :meth:`VDMConfig.resolve_architecture` (also run before training starts)."""
    shape = tuple(meta.sample_shape)
    if cfg.resolve_architecture(shape) == "unet":
        return UNet(shape[0], cfg.channels, cfg.emb_dim, periodic=cfg.periodic, ndim=len(shape) - 1,
                    activation_checkpointing=cfg.activation_checkpointing, levels=cfg.unet_levels,
                    zero_mode=cfg.zero_mode)
    if cfg.activation_checkpointing:
        raise ValueError(f"vdm.activation_checkpointing=true needs the UNet; samples {shape} get the MLP "
                         "(vdm.architecture=auto), which has no blocks to checkpoint")
    return MLP(int(np.prod(shape)), cfg.mlp_hidden, cfg.mlp_layers, cfg.emb_dim)
