"""Small GAN networks: conv nets for lattices and images, MLPs for vectors.

Generators map a latent vector h (plus an optional label) to a sample in *model space*
(spins and levels in [-1, 1] via tanh, continuous data unbounded); the data mapping lives in
the objective. Discriminators map a sample (plus an optional label) to ``num_outputs``
logits or critic scores. No batch norm anywhere in D: the objectives put real, fake and
(for WGAN-GP) interpolated samples through D in one concatenated forward, and the gradient
penalty needs per-sample gradients, both of which batch statistics would couple
(Gulrajani et al. 2017, Sec. 4: "no critic batch normalization").

Conditioning: G concatenates a label embedding to h; D is a projection discriminator
(Miyato & Koyama 2018, eq. 3): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as _sn

LabelKind = Literal["none", "class", "continuous"]
PaddingMode = Literal["zeros", "circular"]


class LabelEmbedding(nn.Module):
    """Class index -> learned vector; continuous label (temperature) -> small MLP of the
    standardised value (mean/std of the data's label values, so T in [1.5, 3.5] is O(1))."""

    def __init__(self, label_kind: LabelKind, dim: int, num_classes: int | None = None,
                 label_mean: float = 0.0, label_std: float = 1.0):
        super().__init__()
        self.label_kind = label_kind
        if label_kind == "class":
            if not num_classes or num_classes < 2:
                raise ValueError(f"class labels need num_classes >= 2, got {num_classes}")
            self.embed = nn.Embedding(num_classes, dim)
        elif label_kind == "continuous":
            if label_std <= 0:
                raise ValueError(f"label_std must be > 0, got {label_std}")
            self.label_mean, self.label_std = float(label_mean), float(label_std)
            self.embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            raise ValueError(f"label_kind must be 'class' or 'continuous' for an embedding, got {label_kind!r}")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.label_kind == "class":
            return self.embed(y.long())
        t = (y.float().reshape(-1, 1) - self.label_mean) / self.label_std
        return self.embed(t.to(self.embed[0].weight.dtype))  # bf16 when a backend converted weights


def _maybe_sn(m: nn.Module, use: bool) -> nn.Module:
    # Spectral normalisation (Miyato et al. 2018) bounds each layer's Lipschitz constant.
    return _sn(m) if use else m


class _Discriminator(nn.Module):
    """Shared head: features phi(x) -> num_outputs, plus the projection term if conditional."""

    def _init_head(self, feat_dim: int, num_outputs: int, label_embedding: LabelEmbedding | None,
                   use_sn: bool) -> None:
        self.num_outputs = num_outputs
        self.head = _maybe_sn(nn.Linear(feat_dim, num_outputs), use_sn)
        self.label_embedding = label_embedding
        if label_embedding is not None and num_outputs != 1:
            raise ValueError("a conditional (projection) discriminator has a single output")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Returns [B, num_outputs]."""
        phi = self.features(x)
        out = self.head(phi)
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this discriminator is conditional: labels are required")
            out = out + (self.label_embedding(labels) * phi).sum(dim=1, keepdim=True)
        return out


class MLPDiscriminator(_Discriminator):
    def __init__(self, sample_shape: tuple[int, ...], hidden: list[int], num_outputs: int = 1,
                 label_embedding: LabelEmbedding | None = None, spectral_norm: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("MLPDiscriminator needs at least one hidden width")
        layers: list[nn.Module] = []
        d = math.prod(sample_shape)
        for w in hidden:
            layers += [_maybe_sn(nn.Linear(d, w), spectral_norm), nn.LeakyReLU(0.2)]
            d = w
        self.net = nn.Sequential(nn.Flatten(), *layers)
        self._init_head(d, num_outputs, label_embedding, spectral_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDiscriminator(_Discriminator):
    """Stride-2 4x4 convolutions (one per entry of ``channels``), LeakyReLU(0.2).

    With circular padding (periodic lattices such as the Ising model) the features are
    averaged over all positions, so D is exactly invariant under cyclic translations by
    multiples of 2**len(channels), a symmetry of the physical ensemble. With zero padding
    (images, where position matters) the feature map is flattened.
    """

    def __init__(self, sample_shape: tuple[int, ...], channels: list[int], num_outputs: int = 1,
                 label_embedding: LabelEmbedding | None = None, spectral_norm: bool = False,
                 padding_mode: PaddingMode = "zeros"):
        super().__init__()
        if len(sample_shape) != 3:
            raise ValueError(f"ConvDiscriminator needs samples of shape (C, H, W), got {sample_shape}")
        if not channels:
            raise ValueError("ConvDiscriminator needs at least one entry in channels")
        c, h, w = sample_shape
        layers: list[nn.Module] = []
        for width in channels:
            if h < 2 or w < 2:
                raise ValueError(
                    f"sample shape {sample_shape} is too small for {len(channels)} stride-2 stages "
                    f"(channels={channels}); use fewer channels entries"
                )
            layers += [_maybe_sn(nn.Conv2d(c, width, 4, stride=2, padding=1, padding_mode=padding_mode),
                                 spectral_norm), nn.LeakyReLU(0.2)]
            c, h, w = width, h // 2, w // 2
        self.net = nn.Sequential(*layers)
        self.pool = padding_mode == "circular"
        feat_dim = c if self.pool else c * h * w
        self._init_head(feat_dim, num_outputs, label_embedding, spectral_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        return f.mean(dim=(2, 3)) if self.pool else f.flatten(1)


class _Generator(nn.Module):
    def _init_cond(self, latent_dim: int, label_embedding: LabelEmbedding | None, label_dim: int,
                   bounded: bool) -> int:
        self.latent_dim = latent_dim
        self.label_embedding = label_embedding
        self.bounded = bounded  # tanh output: spins and levels live in [-1, 1]
        return latent_dim + (label_dim if label_embedding is not None else 0)

    def _input(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.label_embedding is None:
            return h
        if labels is None:
            raise ValueError("this generator is conditional: labels are required")
        return torch.cat([h, self.label_embedding(labels)], dim=1)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y) if self.bounded else y


class MLPGenerator(_Generator):
    def __init__(self, latent_dim: int, sample_shape: tuple[int, ...], hidden: list[int], bounded: bool,
                 label_embedding: LabelEmbedding | None = None, label_dim: int = 0):
        super().__init__()
        d = self._init_cond(latent_dim, label_embedding, label_dim, bounded)
        layers: list[nn.Module] = []
        for w in hidden:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        layers.append(nn.Linear(d, math.prod(sample_shape)))
        self.net = nn.Sequential(*layers)
        self.sample_shape = tuple(sample_shape)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.net(self._input(h, labels)).reshape(-1, *self.sample_shape)
        return self._output(y)


class ConvGenerator(_Generator):
    """Linear to a (channels[-1], H/2^n, W/2^n) map, then n stages of nearest 2x upsampling +
    3x3 conv + ReLU (upsample+conv avoids the checkerboard of transposed convolutions,
    Odena et al. 2016), then a 3x3 conv to the sample's channels."""

    def __init__(self, latent_dim: int, sample_shape: tuple[int, ...], channels: list[int], bounded: bool,
                 label_embedding: LabelEmbedding | None = None, label_dim: int = 0,
                 padding_mode: PaddingMode = "zeros"):
        super().__init__()
        if len(sample_shape) != 3:
            raise ValueError(f"ConvGenerator needs samples of shape (C, H, W), got {sample_shape}")
        if not channels:
            raise ValueError("ConvGenerator needs at least one entry in channels")
        c_out, h, w = sample_shape
        n = len(channels)
        if h % 2**n or w % 2**n:
            raise ValueError(
                f"ConvGenerator with {n} upsampling stages (len(channels)={n}) needs H and W divisible "
                f"by {2**n}; got sample shape {sample_shape}. Use fewer channels entries."
            )
        d = self._init_cond(latent_dim, label_embedding, label_dim, bounded)
        widths = list(reversed(channels))
        self.start_shape = (widths[0], h // 2**n, w // 2**n)
        self.fc = nn.Linear(d, math.prod(self.start_shape))
        layers: list[nn.Module] = []
        c = widths[0]
        for width in widths:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c, width, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
            c = width
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, padding_mode=padding_mode))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = F.relu(self.fc(self._input(h, labels))).reshape(-1, *self.start_shape)
        return self._output(self.net(x))


def build_gan_nets(
    *,
    sample_shape: tuple[int, ...],
    latent_dim: int,
    widths: list[int],
    arch: Literal["conv", "mlp"],
    bounded: bool,
    d_outputs: int = 1,
    label_kind: LabelKind = "none",
    num_classes: int | None = None,
    label_values: tuple[float, ...] | None = None,
    spectral_norm: bool = False,
    padding_mode: PaddingMode = "zeros",
    label_dim: int = 16,
) -> tuple[nn.Module, nn.Module]:
    """(G, D). ``label_kind != "none"`` builds the conditional variants."""

    def embedding(dim: int) -> LabelEmbedding | None:
        if label_kind == "none":
            return None
        mean, std = 0.0, 1.0
        if label_kind == "continuous" and label_values:
            v = torch.tensor(label_values, dtype=torch.float64)
            mean, std = float(v.mean()), float(v.std(unbiased=False)) if len(label_values) > 1 else 1.0
            std = std if std > 0 else 1.0
        return LabelEmbedding(label_kind, dim, num_classes, mean, std)

    if arch == "conv":
        g = ConvGenerator(latent_dim, sample_shape, widths, bounded, embedding(label_dim), label_dim, padding_mode)
        d_feat = widths[-1]
        if padding_mode != "circular":
            c, h, w = sample_shape
            d_feat = widths[-1] * (h // 2 ** len(widths)) * (w // 2 ** len(widths))
        d = ConvDiscriminator(sample_shape, widths, d_outputs, embedding(d_feat), spectral_norm, padding_mode)
    elif arch == "mlp":
        g = MLPGenerator(latent_dim, sample_shape, widths, bounded, embedding(label_dim), label_dim)
        d = MLPDiscriminator(sample_shape, list(reversed(widths)), d_outputs, embedding(widths[0]), spectral_norm)
    else:
        raise ValueError(f"arch must be 'conv' or 'mlp', got {arch!r}")
    return g, d
