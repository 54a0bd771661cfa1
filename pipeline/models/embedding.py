"""Conditioning embeddings: Fourier features of a scalar, and the one label embedding that
the VDM's denoiser and the GAN's G and D share (issue 14).

A class index gets a learned vector (``nn.Embedding``). A continuous label (a temperature, an
incident energy) is first standardised by the data's label statistics
(:func:`label_standardisation`: the listed label values or, too many to list, the range's end
points), so that T in [1.5, 3.5] or E in [1 GeV, 1 TeV] is O(1), then mapped by a small MLP
of either the value itself (``features="value"``: the GAN's G and D) or its Fourier features
(``features="fourier"``: the VDM, whose noise level enters the same way).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

LabelFeatures = Literal["value", "fourier"]
# Angular frequencies of a standardised label's Fourier features, log-spaced: periods from
# 2 pi / 8 ~ 0.8 (finer than the spacing of a few listed values) to 2 pi * 4 ~ 25 standardised
# units (longer than the whole range).
_LABEL_MIN_FREQ, _LABEL_MAX_FREQ = 1 / 4, 8.0


def fourier_features(x: torch.Tensor, dim: int, min_freq: float, max_freq: float) -> torch.Tensor:
    """[B] -> [B, dim]: sin and cos of ``x`` at ``dim // 2`` log-spaced frequencies in
    [min_freq, max_freq] (the sinusoidal position embedding of Vaswani et al. 2017, of a scalar)."""
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, device=x.device))
    a = x.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], dim=1)


def label_standardisation(label_values: tuple[float, ...] | None,
                          label_range: tuple[float, float] | None) -> tuple[float, float]:
    """(mean, std) that a continuous label is standardised by: of the listed values, else of
    the range's two end points (mean: the midpoint, std: half the width), else of [0, 1] (a
    manifest that records neither). Population std; 1.0 where it is 0 (a single value)."""
    v = torch.tensor(label_values or label_range or (0.0, 1.0), dtype=torch.float64)
    std = float(v.std(unbiased=False)) if len(v) > 1 else 1.0
    return float(v.mean()), std if std > 0 else 1.0


class LabelEmbedding(nn.Module):
    """Label [B] -> [B, dim]: class index -> learned vector; continuous label -> MLP of the
    standardised value (``features="value"``) or of its Fourier features (``"fourier"``)."""

    def __init__(self, label_kind: str, dim: int, num_classes: int | None = None, label_mean: float = 0.0,
                 label_std: float = 1.0, *, features: LabelFeatures = "value"):
        super().__init__()
        self.label_kind, self.features, self.dim = label_kind, features, dim
        if label_kind == "class":
            if not num_classes or num_classes < 1:
                raise ValueError(f"label_kind 'class' needs num_classes >= 1, got {num_classes}")
            self.embed = nn.Embedding(num_classes, dim)
        elif label_kind == "continuous":
            if label_std <= 0:
                raise ValueError(f"label_std must be > 0, got {label_std}")
            if features not in ("value", "fourier"):
                raise ValueError(f"features must be 'value' or 'fourier', got {features!r}")
            self.label_mean, self.label_std = float(label_mean), float(label_std)
            width_in = 1 if features == "value" else dim
            self.embed = nn.Sequential(nn.Linear(width_in, dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            raise ValueError(f"label_kind must be 'class' or 'continuous' for an embedding, got {label_kind!r}")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.label_kind == "class":
            return self.embed(y.long())
        t = (y.float().reshape(-1) - self.label_mean) / self.label_std
        if self.features == "fourier":
            return self.embed(fourier_features(t, self.dim, _LABEL_MIN_FREQ, _LABEL_MAX_FREQ))
        return self.embed(t[:, None])
