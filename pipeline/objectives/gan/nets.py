"""G and D for a GAN config and a data set (:func:`build_nets`).

Resolves the config's ``auto`` choices from the data (conv or MLP, circular or zero padding),
checks that the opt-in parts fit the data (spin lattices, labels, the conv networks) and
builds the networks of :mod:`pipeline.models.gan_nets`.
"""

from __future__ import annotations

import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.models.gan_nets import build_gan_nets
from pipeline.objectives.gan.config import GANConfig


def build_nets(cfg: GANConfig, meta: DataMeta) -> tuple[nn.Module, nn.Module]:
    """(G, D) for this config and data, after checking they fit together."""
    shape = tuple(meta.sample_shape)
    arch = cfg.arch if cfg.arch != "auto" else ("conv" if len(shape) == 3 else "mlp")
    if arch == "conv" and len(shape) != 3:
        raise ValueError(f"gan.arch='conv' needs samples of shape (C, H, W); this data has {shape}")
    padding = cfg.padding if cfg.padding != "auto" else ("circular" if meta.data_kind == "spins" else "zeros")
    if cfg.conditional and meta.label_kind == "none":
        raise ValueError("gan.conditional=true but the data has no labels (DataMeta.label_kind='none')")
    if cfg.conditional and meta.label_kind == "class" and not meta.num_classes:
        raise ValueError("gan.conditional=true with class labels needs DataMeta.num_classes")
    if cfg.spin_output != "sign" and meta.data_kind != "spins":
        raise ValueError(f"gan.spin_output={cfg.spin_output!r} needs spin data; this data is {meta.data_kind!r} "
                         f"(use gan.spin_output=sign)")
    if cfg.g_noise_inputs and arch != "conv":
        raise ValueError(f"gan.g_noise_inputs=true needs the conv networks (gan.arch={arch!r})")
    if cfg.g_convs_per_stage != 1 and arch != "conv":
        raise ValueError(f"gan.g_convs_per_stage > 1 needs the conv networks (gan.arch={arch!r})")
    if cfg.g_film and (not cfg.conditional or arch != "conv"):
        raise ValueError(f"gan.g_film=true needs gan.conditional=true and the conv networks (gan.arch={arch!r})")
    if cfg.g_observable_matching > 0 and (meta.data_kind != "spins" or len(shape) != 3 or shape[0] != 1):
        raise ValueError(f"gan.g_observable_matching > 0 needs spin lattices of shape (1, H, W); this data is "
                         f"{meta.data_kind!r} of shape {shape}")
    if cfg.d_lattice_observables and (meta.data_kind != "spins" or arch != "conv"):
        raise ValueError(
            f"gan.d_lattice_observables=true needs spin lattices (data kind 'spins', shape (1, H, W)) and "
            f"the conv networks; this data is {meta.data_kind!r} of shape {shape} with gan.arch={arch!r}"
        )
    d_outputs = 1
    if cfg.semi_supervised != "off":
        if meta.label_kind != "class" or not meta.num_classes or meta.num_classes < 2:
            raise ValueError(
                f"gan.semi_supervised={cfg.semi_supervised!r} needs class labels with num_classes >= 2; "
                f"this data has label_kind={meta.label_kind!r}, num_classes={meta.num_classes}"
            )
        d_outputs = meta.num_classes
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
        spectral_norm=cfg.spectral_norm,
        padding_mode=padding,
        lattice_observables=cfg.d_lattice_observables,
        g_film=cfg.g_film,
        g_noise_inputs=cfg.g_noise_inputs,
        g_convs_per_stage=cfg.g_convs_per_stage,
    )
