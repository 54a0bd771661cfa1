"""Small GAN networks: conv nets for lattices, images and fields, MLPs for vectors.

The conv nets take samples [C, L], [C, H, W] or [C, D, H, W]: their convolutions are those
of the sample's number of spatial dimensions (:mod:`pipeline.models.conv_nd`), everything
else is the same in every dimension, and for [C, H, W] they are the 2D networks they were
before other dimensions existed (same layers, same creation order, same ops).

Generators map a latent vector h (plus an optional label) to a sample in *model space*
(spins and levels in [-1, 1] via tanh, continuous data unbounded); the data mapping lives in
the objective. Discriminators map a sample (plus an optional label) to ``num_outputs``
logits or critic scores. No batch norm anywhere in D: the objectives put real, fake and
(for WGAN-GP) interpolated samples through D in one concatenated forward, and the gradient
penalty needs per-sample gradients, both of which batch statistics would couple
(Gulrajani et al. 2017, Sec. 4: "no critic batch normalization"). The one cross-sample
part, the opt-in minibatch standard deviation (:class:`MinibatchStd`), reads groups of
consecutive samples that stay inside one of those parts.

Conditioning: G concatenates a label embedding (:mod:`pipeline.models.embedding`, shared with
the VDM) to h; D is a projection discriminator
(Miyato & Koyama 2018, eq. 3): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.

Lattice observables (``lattice_observables=True``, spin data): phi(x) also carries each
lattice's bond and magnetisation densities (:func:`lattice_observables`). Through the
projection, D's logit then contains a temperature-dependent quadratic function of the
nearest-neighbour correlation, i.e. of the energy per spin, so D can tell a wrong mean
energy *or* a wrong energy spread (specific heat) at each temperature directly, which a
small conv net's pooled features resolve only coarsely.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as _sn

from pipeline.models.conv_nd import convs
from pipeline.models.embedding import LabelEmbedding, label_standardisation
from pipeline.models.gan_features import (
    NUM_LATTICE_OBSERVABLES,
    MinibatchStd,
    lattice_observables,
    shell_matrix,
    spectral_amplitudes,
)
from pipeline.models.gan_symmetry import with_sign_symmetry

LabelKind = Literal["none", "class", "continuous"]
PaddingMode = Literal["zeros", "circular"]


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
    """Fully connected D. ``minibatch_std`` > 0: a :class:`MinibatchStd` of that group size
    before the last hidden layer, as StyleGAN puts it before its last block (with one hidden
    layer: on the flattened input). ``spectral_features`` (periodic fields [C, *spatial]): the
    input also carries each channel's mean Fourier amplitude per |k| shell
    (:func:`spectral_amplitudes`, k = 0 being sqrt(V) |M|), so D reads the power spectrum and
    the zero mode's size directly instead of finding them among its first layer's directions."""

    def __init__(self, sample_shape: tuple[int, ...], hidden: list[int], num_outputs: int = 1,
                 label_embedding: LabelEmbedding | None = None, spectral_norm: bool = False,
                 minibatch_std: int = 0, spectral_features: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("MLPDiscriminator needs at least one hidden width")
        layers: list[nn.Module] = []
        d = math.prod(sample_shape)
        self.spectral = spectral_features
        if spectral_features:
            if len(sample_shape) < 2:
                raise ValueError(f"spectral features need fields [C, *spatial]; got sample shape {sample_shape}")
            # A function of the shape, not state: not saved in checkpoints.
            self.register_buffer("shells", shell_matrix(tuple(sample_shape[1:])), persistent=False)
            d += sample_shape[0] * self.shells.shape[1]
        for i, w in enumerate(hidden):
            if minibatch_std and i == len(hidden) - 1:
                layers.append(MinibatchStd(minibatch_std))
                d += 1
            layers += [_maybe_sn(nn.Linear(d, w), spectral_norm), nn.LeakyReLU(0.2)]
            d = w
        self.net = nn.Sequential(nn.Flatten(), *layers)
        self._init_head(d, num_outputs, label_embedding, spectral_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.spectral:
            x = torch.cat([x.flatten(1), spectral_amplitudes(x, self.shells).to(x.dtype)], dim=1)
        return self.net(x)


class ConvDiscriminator(_Discriminator):
    """Stride-2 convolutions of kernel 4 per axis (one per entry of ``channels``), LeakyReLU(0.2),
    over samples (C, L), (C, H, W) or (C, D, H, W).

    With circular padding (periodic lattices such as the Ising model) the features are
    averaged over all positions, so D is exactly invariant under cyclic translations by
    multiples of 2**len(channels), a symmetry of the physical ensemble. With zero padding
    (images, where position matters) the feature map is flattened.
    """

    def __init__(self, sample_shape: tuple[int, ...], channels: list[int], num_outputs: int = 1,
                 label_embedding: LabelEmbedding | None = None, spectral_norm: bool = False,
                 padding_mode: PaddingMode = "zeros", lattice_observables: bool = False, head_hidden: int = 0,
                 spectral_features: bool = False):
        super().__init__()
        conv = convs(len(sample_shape) - 1, f"ConvDiscriminator (samples of shape {tuple(sample_shape)})")[0]
        if lattice_observables and (len(sample_shape) != 3 or sample_shape[0] != 1 or padding_mode != "circular"):
            raise ValueError(
                "lattice observables need single-channel spin lattices with periodic (circular) padding; "
                f"got sample shape {sample_shape}, padding {padding_mode!r}"
            )
        if not channels:
            raise ValueError("ConvDiscriminator needs at least one entry in channels")
        c, spatial = sample_shape[0], tuple(sample_shape[1:])
        layers: list[nn.Module] = []
        for width in channels:
            if min(spatial) < 2:
                raise ValueError(
                    f"sample shape {sample_shape} is too small for {len(channels)} stride-2 stages "
                    f"(channels={channels}); use fewer channels entries"
                )
            layers += [_maybe_sn(conv(c, width, 4, stride=2, padding=1, padding_mode=padding_mode),
                                 spectral_norm), nn.LeakyReLU(0.2)]
            c, spatial = width, tuple(s // 2 for s in spatial)
        self.net = nn.Sequential(*layers)
        self.pool = padding_mode == "circular"
        self.observables = lattice_observables
        # spectral_features: the mean Fourier amplitude per |k| shell of each channel
        # (spectral_amplitudes): a strided conv net sees the modes at its own sampling
        # frequencies (k = 0, the Nyquist modes) only through its aliasing.
        self.spectral = spectral_features
        if spectral_features:
            if padding_mode != "circular":
                raise ValueError("spectral features need periodic fields (circular padding)")
            # A function of the shape, not state: not saved in checkpoints.
            self.register_buffer("shells", shell_matrix(tuple(sample_shape[1:])), persistent=False)
        feat_dim = self.feature_dim(sample_shape, channels, padding_mode, lattice_observables, 0, spectral_features)
        # head_hidden > 0: a hidden layer between the pooled features and the output. Without
        # it, D(x) = mean over positions of a function of one receptive field, so the critic's
        # expectation depends only on the distribution of single patches: it cannot see how a
        # sum over the whole lattice (the magnetisation, the k = 0 mode) is spread. A
        # nonlinearity after the pooling can, and D stays invariant under the translations.
        self.post = None
        if head_hidden > 0:
            self.post = nn.Sequential(_maybe_sn(nn.Linear(feat_dim, head_hidden), spectral_norm), nn.LeakyReLU(0.2))
            feat_dim = head_hidden
        self._init_head(feat_dim, num_outputs, label_embedding, spectral_norm)

    @staticmethod
    def feature_dim(sample_shape: tuple[int, ...], channels: list[int], padding_mode: PaddingMode,
                    lattice_observables: bool, head_hidden: int, spectral_features: bool) -> int:
        """Width of phi(x), the features the head (and a projection's label embedding) reads."""
        if head_hidden > 0:
            return head_hidden
        spatial = [s // 2 ** len(channels) for s in sample_shape[1:]]
        width = channels[-1] if padding_mode == "circular" else channels[-1] * math.prod(spatial)
        width += NUM_LATTICE_OBSERVABLES if lattice_observables else 0
        return width + (sample_shape[0] * shell_matrix(tuple(sample_shape[1:])).shape[1] if spectral_features else 0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        f = f.mean(dim=tuple(range(2, f.dim()))) if self.pool else f.flatten(1)
        if self.observables:
            f = torch.cat([f, lattice_observables(x).to(f.dtype)], dim=1)
        if self.spectral:
            f = torch.cat([f, spectral_amplitudes(x, self.shells).to(f.dtype)], dim=1)
        return f if self.post is None else self.post(f)


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
    """For samples (C, *S), S = (L,), (H, W) or (D, H, W) (3x3 below: kernel 3 per axis):
    linear to a (channels[-1], S/2^n) map, then n stages of nearest 2x upsampling +
    3x3 conv + ReLU (upsample+conv avoids the checkerboard of transposed convolutions,
    Odena et al. 2016), then a 3x3 conv to the sample's channels. ``convs_per_stage`` > 1 adds
    3x3 conv + ReLU units at each stage's resolution (StyleGAN2's G has two per resolution):
    more depth where the fine structure is drawn, e.g. the short-range bond correlations.

    ``film=True`` (conditional G): the label embedding also scales and shifts every stage's
    conv output, x -> x * (1 + gamma(e)) + beta(e) (FiLM, Perez et al. 2018), so the label
    reaches the fine scales directly instead of only through the first linear layer.
    gamma and beta start at 0: an untrained FiLM G computes what the plain one does.
    (Here and below "every stage" means every conv unit.)

    ``noise_inputs=True``: per-site Gaussian noise maps, one per conv unit at its resolution,
    are added to the unit's features with a learned per-channel strength (StyleGAN's noise
    inputs, Karras et al. 2019, Sec. 3.2; strengths start at 0). They give G independent
    randomness at every site and scale, the stochastic detail a vector latent pushed through
    upsampling renders only as smooth blobs (e.g. thermal spin flips and small clusters in
    Ising lattices). The maps are the last ``latent_dim - vector_latent_dim``
    entries of h: ``G.latent_dim`` counts them, so seeded sampling stays reproducible."""

    def __init__(self, latent_dim: int, sample_shape: tuple[int, ...], channels: list[int], bounded: bool,
                 label_embedding: LabelEmbedding | None = None, label_dim: int = 0,
                 padding_mode: PaddingMode = "zeros", film: bool = False, noise_inputs: bool = False,
                 convs_per_stage: int = 1, zero_mode: bool = False):
        super().__init__()
        if film and label_embedding is None:
            raise ValueError("FiLM conditioning needs a conditional generator (a label embedding)")
        conv = convs(len(sample_shape) - 1, f"ConvGenerator (samples of shape {tuple(sample_shape)})")[0]
        if not channels:
            raise ValueError("ConvGenerator needs at least one entry in channels")
        if convs_per_stage < 1:
            raise ValueError(f"ConvGenerator needs convs_per_stage >= 1, got {convs_per_stage}")
        c_out, spatial = sample_shape[0], tuple(sample_shape[1:])
        n = len(channels)
        if any(s % 2**n for s in spatial):
            raise ValueError(
                f"ConvGenerator with {n} upsampling stages (len(channels)={n}) needs every spatial size divisible "
                f"by {2**n}; got sample shape {sample_shape}. Use fewer channels entries."
            )
        d = self._init_cond(latent_dim, label_embedding, label_dim, bounded)
        widths = list(reversed(channels))
        self.start_shape = (widths[0], *(s // 2**n for s in spatial))
        self.fc = nn.Linear(d, math.prod(self.start_shape))
        # Units of (upsample or identity, conv, ReLU): one upsampling unit per stage, then
        # convs_per_stage - 1 at its resolution. With 1 per stage the layer indices (and so
        # the state_dict keys) are those of the plain upsample + conv G.
        layers: list[nn.Module] = []
        unit_widths: list[int] = []
        unit_shapes: list[tuple[int, ...]] = []
        c = widths[0]
        for i, width in enumerate(widths):
            for j in range(convs_per_stage):
                layers += [nn.Upsample(scale_factor=2, mode="nearest") if j == 0 else nn.Identity(),
                           conv(c, width, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
                unit_widths.append(width)
                unit_shapes.append(tuple(s // 2 ** (n - 1 - i) for s in spatial))
                c = width
        layers.append(conv(c, c_out, 3, padding=1, padding_mode=padding_mode))
        self.net = nn.Sequential(*layers)
        self.film = None
        if film:
            self.film = nn.ModuleList(nn.Linear(label_dim, 2 * width) for width in unit_widths)
            for lin in self.film:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.vector_latent_dim = latent_dim
        self.noise_shapes: list[tuple[int, ...]] = []
        self.noise_strength = None
        ones = (1,) * len(spatial)  # broadcast over every spatial axis
        if noise_inputs:
            self.noise_shapes = unit_shapes
            self.noise_strength = nn.ParameterList(nn.Parameter(torch.zeros(1, width, *ones)) for width in unit_widths)
            self.latent_dim = latent_dim + sum(math.prod(s) for s in self.noise_shapes)
        self.zero_mode = self._zero_mode_path(d, c_out) if zero_mode else None  # last: the rest as the plain G

    @staticmethod
    def _zero_mode_path(d: int, c_out: int) -> nn.Linear:
        """A per-channel constant, linear in the vector latent (and label), added to the output:
        the field's k = 0 mode drawn on its own path. In a Gaussian field every Fourier mode is
        independent of the others, so the mean can be drawn apart from the fluctuations; through
        upsampling convolutions a lattice-wide shift that varies from sample to sample is hard to
        express (the phi^4 GAN's magnetisation, docs/model_zoo.md). Starts at 0: an untrained G
        computes what the plain one does. Created after every other layer, so their initial
        weights are those of the plain G."""
        path = nn.Linear(d, c_out)
        nn.init.zeros_(path.weight)
        nn.init.zeros_(path.bias)
        return path

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        g_in = self._input(h[:, :self.vector_latent_dim], labels)
        x = F.relu(self.fc(g_in)).reshape(-1, *self.start_shape)
        e = self.label_embedding(labels).to(x.dtype) if self.film is not None else None
        offset = self.vector_latent_dim
        for i in range(len(self.net) // 3):  # units of (upsample or identity, conv, ReLU) in self.net
            up, conv, act = self.net[3 * i:3 * i + 3]
            x = conv(up(x))
            if self.film is not None:
                film = self.film[i](e)
                gamma, beta = film.reshape(*film.shape, *(1,) * (x.dim() - 2)).chunk(2, dim=1)
                x = x * (1.0 + gamma) + beta
            if self.noise_strength is not None:
                shape = self.noise_shapes[i]
                size = math.prod(shape)
                noise = h[:, offset:offset + size].reshape(-1, 1, *shape).to(x.dtype)
                x = x + self.noise_strength[i] * noise
                offset += size
            x = act(x)
        y = self.net[-1](x)
        if self.zero_mode is not None:
            y = y + self.zero_mode(g_in).to(y.dtype).reshape(*y.shape[:2], *(1,) * (y.dim() - 2))
        return self._output(y)


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
    label_range: tuple[float, float] | None = None,
    spectral_norm: bool = False,
    padding_mode: PaddingMode = "zeros",
    label_dim: int = 16,
    lattice_observables: bool = False,
    g_film: bool = False,
    g_noise_inputs: bool = False,
    g_convs_per_stage: int = 1,
    d_head_hidden: int = 0,
    d_spectral_features: bool = False,
    g_zero_mode: bool = False,
    g_sign_symmetric: bool = False,
    d_minibatch_std: int = 0,
    d_sign_symmetric: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """(G, D). ``label_kind != "none"`` builds the conditional variants; ``g_sign_symmetric`` /
    ``d_sign_symmetric`` wrap them (:mod:`pipeline.models.gan_symmetry`)."""

    def embedding(dim: int) -> LabelEmbedding | None:
        if label_kind == "none":
            return None
        mean, std = label_standardisation(label_values, label_range) if label_kind == "continuous" else (0.0, 1.0)
        return LabelEmbedding(label_kind, dim, num_classes, mean, std)

    if arch == "conv" and d_minibatch_std:
        raise ValueError("the minibatch standard deviation is built into the MLP discriminator only (arch='mlp')")
    if arch == "conv":
        g = ConvGenerator(latent_dim, sample_shape, widths, bounded, embedding(label_dim), label_dim, padding_mode,
                          film=g_film, noise_inputs=g_noise_inputs, convs_per_stage=g_convs_per_stage,
                          zero_mode=g_zero_mode)
        d_feat = ConvDiscriminator.feature_dim(sample_shape, widths, padding_mode, lattice_observables, d_head_hidden,
                                               d_spectral_features)
        d = ConvDiscriminator(sample_shape, widths, d_outputs, embedding(d_feat), spectral_norm, padding_mode,
                              lattice_observables, d_head_hidden, d_spectral_features)
    elif arch == "mlp":
        if lattice_observables or g_film or g_noise_inputs or g_convs_per_stage != 1 or d_head_hidden or g_zero_mode:
            raise ValueError("lattice observables, FiLM, noise inputs, g_convs_per_stage > 1, d_head_hidden "
                             "and G's zero-mode path need the conv networks (arch='conv')")
        if d_spectral_features and padding_mode != "circular":
            raise ValueError("spectral features need periodic fields (circular padding)")
        g = MLPGenerator(latent_dim, sample_shape, widths, bounded, embedding(label_dim), label_dim)
        d = MLPDiscriminator(sample_shape, list(reversed(widths)), d_outputs, embedding(widths[0]), spectral_norm,
                             d_minibatch_std, d_spectral_features)
    else:
        raise ValueError(f"arch must be 'conv' or 'mlp', got {arch!r}")
    return with_sign_symmetry(g, d, g_sign_symmetric, d_sign_symmetric)
