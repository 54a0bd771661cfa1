"""G and D for a GAN config and a data set (:func:`build_nets`).

Resolves the config's ``auto`` choices from the data and checks that the opt-in parts fit it
(:meth:`GANConfig.check_data`, also run before training starts), then builds the networks of
:mod:`pipeline.models.gan_nets`.
"""

from __future__ import annotations

import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.models.gan_nets import build_gan_nets
from pipeline.objectives.gan.config import GANConfig


def build_nets(cfg: GANConfig, meta: DataMeta) -> tuple[nn.Module, nn.Module]:
    """(G, D) for this config and data, after checking they fit together."""
    shape = tuple(meta.sample_shape)
    arch, padding, d_outputs = cfg.check_data(meta)
    return build_gan_nets(
        sample_shape=shape,
        latent_dim=cfg.latent_dim,
        widths=list(cfg.channels),
        arch=arch,
        bounded=meta.data_kind in ("spins", "levels"),
        d_outputs=d_outputs,
        label_kind=meta.label_kind if cfg.conditional else "none",
        num_classes=meta.num_classes,
        label_values=meta.label_values,
        label_range=meta.label_range,
        spectral_norm=cfg.spectral_norm,
        padding_mode=padding,
        lattice_observables=cfg.d_lattice_observables,
        g_film=cfg.g_film,
        g_noise_inputs=cfg.g_noise_inputs,
        g_convs_per_stage=cfg.g_convs_per_stage,
        d_head_hidden=cfg.d_head_hidden,
        d_spectral_features=cfg.d_spectral_features,
        g_zero_mode=cfg.g_zero_mode,
        g_sign_symmetric=cfg.g_sign_symmetric,
        d_sign_symmetric=cfg.d_sign_symmetric,
        d_minibatch_std=cfg.d_minibatch_std,
    )
