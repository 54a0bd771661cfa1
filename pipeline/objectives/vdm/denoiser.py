"""The VDM's eps-prediction network: eps_hat(z, gamma, label) around a UNet or an MLP."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.meta import DataMeta
from pipeline.models import MLP, UNet
from pipeline.models.embedding import LabelEmbedding, fourier_features, label_standardisation
from pipeline.objectives.data_space import DataSpace
from pipeline.objectives.vdm.config import VDMConfig
from pipeline.objectives.vdm.terms import alpha_sq, sigma_sq


class Denoiser(nn.Module):
    """eps_hat(z, gamma, label): wraps a network with noise-level and label embeddings.

    The noise level enters as gamma (not time), so a schedule change with the same
    endpoints leaves the model unchanged (Kingma et al. 2021 sec. 5.1). Labels go through the
    shared :class:`~pipeline.models.embedding.LabelEmbedding` (continuous ones as Fourier
    features of the standardised value), added to the noise-level embedding.

    ``skip``: a :class:`GaussianSkip`, :class:`SpectralSkip`, :class:`SparseSkip` or
    :class:`DiscreteSkip`, eps_hat =
    skip(z, gamma) + net(...): the network learns the correction to the skip's exact answer for
    a simpler distribution.
    """

    def __init__(self, net: nn.Module, emb_dim: int, meta: DataMeta, skip: nn.Module | None = None):
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

    def batch_sums(self, x0: torch.Tensor) -> torch.Tensor:
        """sum(x), sum(x^2) over a batch [B, *sample_shape] in model space: [2, *sample_shape], float64."""
        x64 = x0.detach().double()
        return torch.stack([x64.sum(0), (x64 * x64).sum(0)])

    def add(self, sums: torch.Tensor, count: torch.Tensor) -> None:
        """Add :meth:`batch_sums` over ``count`` more samples (gathered over ranks)."""
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
        alpha, sigma = alpha_sq(g).sqrt(), sigma_sq(g).sqrt()
        return sigma * (z - alpha * mean) / (alpha**2 * var + sigma**2)


class SpectralSkip(nn.Module):
    """E[eps | z] for a stationary Gaussian field on a periodic grid with the data's mean and power
    spectrum per channel: per Fourier mode k, eps_hat(k) = sigma (z - alpha mu)(k) / (alpha^2 P(k) +
    sigma^2), the Wiener filter (the exact denoiser of ``pipeline.eval.grf.ExactGRFDenoiser`` with
    P estimated from the data). :class:`GaussianSkip` takes the covariance diagonal over sites;
    a stationary field's is diagonal over Fourier modes instead, with variances P(k) far from one
    site's (P(0) = 47, P at the corner 0.09 for the grf2d preset's field, C(0) = 0.99). The
    network then learns only the non-Gaussian part (zero for a Gaussian field). Why it is needed
    there: the exact filter's gain 1 / (alpha^2 P(k) + sigma^2) with P ~ |k|^-2 has a cusp at the
    Nyquist row (|k|^2 is not periodic on the Brillouin zone), which no convolution of finite
    reach reproduces; the UNet under-denoises those modes by 6-10 % at low noise and the
    samples' power there comes out 8-11 % high (docs/model_zoo.md, grf2d).

    mu (one per channel) and P (per channel and half-grid mode of ``rfftn``, with the
    unnormalised convention E|x_hat(k)|^2 / N = P(k) of ``pipeline/physics/grf.py``) are
    estimated from every sample trained on (float64 sums, gathered over ranks as for
    GaussianSkip); before any data mu = 0 and P = 1 (white noise of unit variance, the same
    start as GaussianSkip's). Channels are treated as independent (cross-spectra ignored)."""

    MIN_POWER = 1e-6

    def __init__(self, sample_shape: tuple[int, ...]):
        super().__init__()
        assert len(sample_shape) >= 2, sample_shape  # [C, *spatial], checked by VDMConfig.check_data
        self.channels, self.spatial = sample_shape[0], tuple(sample_shape[1:])
        self.axes = tuple(range(-len(self.spatial), 0))
        half = self.spatial[:-1] + (self.spatial[-1] // 2 + 1,)
        self.num_sites = int(np.prod(self.spatial))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        # [C] sum of x over samples and sites; [C, *half] sum of |rfftn(x)|^2 / N over samples.
        self.register_buffer("mean_sums", torch.zeros(self.channels, dtype=torch.float64))
        self.register_buffer("power_sums", torch.zeros((self.channels,) + half, dtype=torch.float64))

    def batch_sums(self, x0: torch.Tensor) -> torch.Tensor:
        """The batch's sums, flattened into one float64 vector (gathered as one tensor)."""
        x64 = x0.detach().double()
        power = torch.fft.rfftn(x64, dim=self.axes).abs().square().sum(0) / self.num_sites
        return torch.cat([x64.sum(0).flatten(1).sum(1), power.flatten()])

    def add(self, sums: torch.Tensor, count: torch.Tensor) -> None:
        c = self.channels
        self.mean_sums += sums[:c].to(self.mean_sums)
        self.power_sums += sums[c:].reshape(self.power_sums.shape).to(self.power_sums)
        self.count += count.to(self.count)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [C], power [C, *half]); (0, 1) before any data. P(0) is that of x - mu:
        E|x_hat(0)|^2 / N = P(0) + N mu^2."""
        seen = self.count > 0
        n = self.count.clamp_min(1.0)
        mean = self.mean_sums / (n * self.num_sites)
        power = self.power_sums / n
        zero = (slice(None),) + (0,) * len(self.spatial)
        power[zero] = power[zero] - self.num_sites * mean**2
        power = power.clamp_min(self.MIN_POWER)
        return (torch.where(seen, mean, torch.zeros_like(mean)),
                torch.where(seen, power, torch.ones_like(power)))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        mean, power = self.moments()
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32  # no FFT in bf16
        g = gamma.to(dtype).reshape((-1,) + (1,) * (z.dim() - 1))
        a2, s2 = alpha_sq(g), sigma_sq(g)
        zc = z.to(dtype) - a2.sqrt() * mean.to(dtype).reshape((-1,) + (1,) * len(self.spatial))
        z_hat = torch.fft.rfftn(zc, dim=self.axes)
        eps = torch.fft.irfftn(z_hat * (s2.sqrt() / (a2 * power.to(dtype) + s2)), s=self.spatial, dim=self.axes)
        return eps.to(z.dtype)


class SparseSkip(nn.Module):
    """E[eps | z] for independent values that are each exactly ``atom`` (an empty voxel) with
    probability pi, else Gaussian with mean mu and variance v (pi, mu, v per value, from the data):

        r = pi N(z; alpha atom, sigma^2) / (pi N(z; alpha atom, sigma^2) + (1 - pi) N(z; alpha mu, alpha^2 v + sigma^2))
        E[eps | z] = r (z - alpha atom) / sigma + (1 - r) sigma (z - alpha mu) / (alpha^2 v + sigma^2)

    (the posterior mean of x is the responsibility-weighted mean of the two components' posterior
    means; the second term is :class:`GaussianSkip`'s with the non-empty values' moments). Why:
    calorimeter voxels are empty 80 % of the time (a point mass at ``atom``, the model-space image
    of 0) and otherwise log-normal-like. :class:`GaussianSkip` fits one Gaussian across both modes,
    so its denoiser pulls every value towards a mean between them, where the data has none; the
    vdm_calo UNet trained beside it drew non-empty values too spread (std of log10 0.60-0.65 vs
    0.47-0.50) and lost the rare large deposits (docs/model_zoo.md). This skip starts the network
    from a denoiser that commits each value to one mode.

    pi, mu and v come from every sample trained on (float64 sums gathered over ranks as for
    GaussianSkip); a value within ``ATOL`` of ``atom`` counts as empty. Before any data pi = 0,
    mu = 0 and v = 1 (GaussianSkip's start); with pi = 0 it is GaussianSkip."""

    MIN_VAR = GaussianSkip.MIN_VAR
    ATOL = 1e-6  # transforms map an empty value to atom exactly; a margin for float32 round-off

    def __init__(self, sample_shape: tuple[int, ...], atom: float):
        super().__init__()
        self.atom = float(atom)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        # [3, *sample_shape]: number of empty values, sum and sum of squares of the non-empty ones.
        self.register_buffer("sums", torch.zeros((3,) + tuple(sample_shape), dtype=torch.float64))

    def batch_sums(self, x0: torch.Tensor) -> torch.Tensor:
        x64 = x0.detach().double()
        empty = (x64 - self.atom).abs() <= self.ATOL
        full = torch.where(empty, 0.0, x64)
        return torch.stack([empty.double().sum(0), full.sum(0), (full * full).sum(0)])

    add = GaussianSkip.add  # the same update of the float64 sums and the count

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pi, mu, v) per value: the fraction of empty values and the non-empty values' mean and
        variance; (0, 0, 1) before any data and (mu, v) = (0, 1) where every value was empty."""
        num_empty = self.sums[0]
        num_full = self.count - num_empty
        pi = num_empty / self.count.clamp_min(1.0)
        n = num_full.clamp_min(1.0)
        mean = self.sums[1] / n
        var = (self.sums[2] / n - mean**2).clamp_min(self.MIN_VAR)
        seen = num_full > 0
        return pi, torch.where(seen, mean, torch.zeros_like(mean)), torch.where(seen, var, torch.ones_like(var))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        # float32 at least: the responsibility is a ratio of Gaussians many standard deviations out.
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        pi, mean, var = (m.to(dtype) for m in self.moments())
        zf = z.to(dtype)
        g = gamma.to(dtype).reshape((-1,) + (1,) * (z.dim() - 1))
        a2, s2 = alpha_sq(g), sigma_sq(g)
        alpha, sigma = a2.sqrt(), s2.sqrt()
        v_full = a2 * var + s2
        d_empty, d_full = zf - alpha * self.atom, zf - alpha * mean
        # log of each component's weight pi N(z; .): the log-odds of "empty" (pi = 0 or 1 give -+inf).
        log_odds = (torch.log(pi) - 0.5 * d_empty**2 / s2 - 0.5 * torch.log(s2)) - (
            torch.log1p(-pi) - 0.5 * d_full**2 / v_full - 0.5 * torch.log(v_full))
        r = torch.sigmoid(log_odds)
        eps = r * (d_empty / sigma) + (1 - r) * (sigma * d_full / v_full)
        return eps.to(z.dtype)


class DiscreteSkip(nn.Module):
    """E[eps | z] for independent values that each take one of the data's K model-space values
    g_k (+-1 spins; k levels spread over [-1, 1]) with probability pi_k per value, from the data:

        w_k = softmax_k(log pi_k - (z - alpha g_k)^2 / (2 sigma^2)),  E[x | z] = sum_k w_k g_k,
        E[eps | z] = (z - alpha E[x | z]) / sigma

    (for spins with pi_+ = pi_- this is x_hat = tanh(alpha z / sigma^2), the mean-field posterior).
    Why: discrete values are recovered exactly from z well before the noise vanishes (+-1 spins
    are 2 apart), so the exact eps_hat at low noise is (z - alpha x) / sigma, which an
    eps-predicting network must reproduce with a gain 1 / sigma that grows without bound as
    gamma falls: Kingma et al.'s gamma_min = -13.3 cost the Ising VDM a 6x higher loss
    (docs/model_zoo.md). This skip is that answer, so the low-noise terms cost nothing to learn
    and the network models only the values' correlations.

    pi comes from every sample trained on (float64 counts per value and level, gathered over ranks
    as for :class:`GaussianSkip`); before any data every level is equally likely. A level never
    seen at a value keeps ``MIN_PROB``: a held-out sample that has it there (a digit's stroke in a
    corner no training digit touched) is then recovered once the noise is low enough, instead
    of costing a loss that grows as 1 / sigma^2 down to gamma_min."""

    MIN_PROB = 1e-6

    def __init__(self, sample_shape: tuple[int, ...], values: torch.Tensor):
        super().__init__()
        assert values.dim() == 1 and values.numel() >= 2, values
        self.register_buffer("values", values.to(torch.float64).clone())
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        # [K, *sample_shape]: how often each value took each level.
        self.register_buffer("sums", torch.zeros((values.numel(),) + tuple(sample_shape), dtype=torch.float64))

    def batch_sums(self, x0: torch.Tensor) -> torch.Tensor:
        x64 = x0.detach().double()
        grid = self.values.reshape((-1,) + (1,) * x64.dim())
        level = (x64.unsqueeze(0) - grid).abs().argmin(0)  # model-space values sit on the grid
        return torch.nn.functional.one_hot(level, self.values.numel()).double().sum(0).movedim(-1, 0)

    add = GaussianSkip.add  # the same update of the float64 counts and the sample count

    def probabilities(self) -> torch.Tensor:
        """pi [K, *sample_shape]; 1 / K before any data."""
        k = self.values.numel()
        return torch.where(self.count > 0, self.sums / self.count.clamp_min(1.0), torch.full_like(self.sums, 1.0 / k))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        # float32 at least: the weights are ratios of Gaussians many standard deviations out.
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        pi = self.probabilities().to(dtype).unsqueeze(1)  # [K, 1 (batch), *sample_shape]
        grid = self.values.to(dtype).reshape((-1,) + (1,) * z.dim())
        zf = z.to(dtype)
        g = gamma.to(dtype).reshape((-1,) + (1,) * (z.dim() - 1))
        a2, s2 = alpha_sq(g), sigma_sq(g)
        alpha = a2.sqrt()
        # -(z - alpha g_k)^2 / (2 sigma^2) without the z^2 common to every k.
        logits = torch.log(pi.clamp_min(self.MIN_PROB)) + (alpha * zf * grid - 0.5 * a2 * grid**2) / s2
        x_hat = (torch.softmax(logits, dim=0) * grid).sum(0)
        return ((zf - alpha * x_hat) / s2.sqrt()).to(z.dtype)


def build_skip(kind: str, sample_shape: tuple[int, ...], space: DataSpace) -> nn.Module | None:
    """The skip named by ``vdm.skip`` (None for "none"); :class:`SparseSkip`'s point mass is
    the model-space image of a stored 0 and :class:`DiscreteSkip`'s levels the discrete data's
    model-space values (``space``)."""
    if kind == "gaussian":
        return GaussianSkip(sample_shape)
    if kind == "spectral":
        return SpectralSkip(sample_shape)
    if kind == "sparse":
        return SparseSkip(sample_shape, space.empty_value())
    if kind == "discrete":
        return DiscreteSkip(sample_shape, space.values())
    assert kind == "none", kind  # VDMConfig's Literal names the choices
    return None


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
                    activation_checkpointing=cfg.activation_checkpointing, levels=cfg.unet_levels)
    if cfg.activation_checkpointing:
        raise ValueError(f"vdm.activation_checkpointing=true needs the UNet; samples {shape} get the MLP "
                         "(vdm.architecture=auto), which has no blocks to checkpoint")
    return MLP(int(np.prod(shape)), cfg.mlp_hidden, cfg.mlp_layers, cfg.emb_dim)
