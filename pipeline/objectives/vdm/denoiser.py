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
    """

    def __init__(self, net: nn.Module, emb_dim: int, meta: DataMeta):
        super().__init__()
        self.net, self.emb_dim, self.label_kind = net, emb_dim, meta.label_kind
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
        return self.net(z, emb)


def _before_shared_label_embedding(module, state_dict, prefix, *args) -> None:
    """Checkpoints and exports written before the VDM used the shared LabelEmbedding name its
    layers ``label_emb.weight`` / ``label_emb.0.weight``; they are now ``label_emb.embed.*``."""
    old = prefix + "label_emb."
    for key in [k for k in state_dict if k.startswith(old) and not k.startswith(old + "embed.")]:
        state_dict[old + "embed." + key[len(old):]] = state_dict.pop(key)


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
