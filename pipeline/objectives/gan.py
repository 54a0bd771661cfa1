"""GAN objectives: the discriminator and generator phases of a two-player game.

The seed's game (Goodfellow et al. 2014, eq. 1) is

    min_G max_D  L(G, D) = E_{x~p_r}[log D(x)] + E_{h~p_h}[log(1 - D(G(h)))].

For fixed G the optimal discriminator is D*(x) = p_r(x) / (p_r(x) + p_g(x)) (Prop. 1) and
L(G, D*) = 2 JS(p_r || p_g) - 2 log 2 (Thm. 1), minimal (-2 log 2, D* = 1/2 everywhere) iff
p_g = p_r. Hence ``js_estimate = (L(G, D) + log 4) / 2``: a lower bound on JS(p_r || p_g)
that is tight when D = D*. Known problems: no guaranteed convergence to the equilibrium, and
when D is near perfect, log(1 - D(G(h))) saturates and G's gradient vanishes (Arjovsky &
Bottou 2017), which motivates the non-saturating loss, and the Wasserstein critic (Arjovsky
et al. 2017; gradient penalty: Gulrajani et al. 2017).

Losses here are small functions of logits (or critic scores), written with softplus /
logsigmoid so they are finite for any logit: log sigmoid(l) = -softplus(-l) and
log(1 - sigmoid(l)) = -softplus(l). Networks live in :mod:`pipeline.models.gan_nets`.

Phases (see :func:`build_phases`): ``DStep`` owns D and trains it against a frozen G;
``GStep`` owns G and trains it through a frozen D. Each holds the other network without
registering it, so DDP / optimizers / ZeRO of a phase see only that phase's parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import StepContext
from pipeline.errors import ConfigError

LOG4 = math.log(4.0)

# d_dominates: for the logistic losses, d(log(1 - D(G(h)))) / d logit = -D(G(h)), so the
# minimax generator's per-sample gradient is scaled by D(G(h)). When the mean of D(G(h)) is
# below 5% of its maximum (1), G learns at < 1/20 of its possible rate: the vanishing-gradient
# regime of Goodfellow et al. 2014 Sec. 3 / Arjovsky & Bottou 2017 Thm. 2.4.
D_DOMINATES_FAKE_PROB = 0.05
# g_collapsed: independent draws from p_r have mean pairwise distance ratio 1 by definition;
# fakes on average 5x closer to each other than reals are indicates G maps most h to a few
# points (mode collapse). A coarse alarm, not a metric: compare diversity_ratio across runs.
G_COLLAPSED_DIVERSITY_RATIO = 0.2
DIVERSITY_MAX_SAMPLES = 64  # pairwise distances on at most this many samples (cost ~ n^2)


@dataclass
class GANConfig:
    loss: Literal["minimax", "non-saturating", "wgan-gp", "hinge"] = "non-saturating"
    latent_dim: int = 64
    latent_prior: Literal["uniform", "normal"] = "uniform"  # uniform: U(-1, 1)^latent_dim (the seed's)
    n_critic: int = 1  # D steps per G step (WGAN-GP: 5)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    # Adam betas of both phases; null = train.betas. WGAN-GP uses (0.0, 0.9), DCGAN (0.5, 0.999).
    betas: tuple[float, float] | None = None
    gp_weight: float = 10.0  # lambda of the gradient penalty (Gulrajani et al. 2017, eq. 3)
    # gamma of the R1 penalty on real data for the logistic losses (Mescheder et al. 2018,
    # eq. 9): D's loss + gamma/2 E_real ||grad_x D(x)||^2. 0 = off. Penalising D's slope on
    # the data makes the game locally convergent where the unregularised one oscillates.
    r1_weight: float = 0.0
    conditional: bool = False  # labels into G and D (projection discriminator)
    # Widths: conv channels per stride-2 stage (G mirrors D), or MLP hidden widths.
    channels: list[int] = field(default_factory=lambda: [64, 128])
    # auto: conv for samples of shape (C, H, W), MLP otherwise.
    arch: Literal["auto", "conv", "mlp"] = "auto"
    # auto: circular (periodic boundary) padding for spins, zeros otherwise.
    padding: Literal["auto", "zeros", "circular"] = "auto"
    spectral_norm: bool = False  # on D's layers (Miyato et al. 2018)
    # Spin lattices only: D's features also carry each lattice's nearest-neighbour, diagonal
    # and distance-2 correlations and |m| (pipeline.models.gan_nets.lattice_observables),
    # so D measures the energy per spin and its spread at every temperature directly.
    d_lattice_observables: bool = False
    # Spin lattices only: how G's tanh output y in (-1, 1) becomes spins. sign: D sees y
    # itself and samples are sign(y); real lattices are exactly +-1, so D can tell fakes by
    # their non-saturated sites and G is pushed to saturate (hard, too ordered lattices).
    # bernoulli: y is each site's mean spin; spins are drawn independently given y
    # (P(s = +1) = (1 + y) / 2), D sees the drawn +-1 lattice, and G's gradient passes
    # straight through the draw (Bengio et al. 2013; exact for D linear in s, since E[s | y] = y).
    # Isolated thermal flips then cost G nothing to express. Samples are drawn the same way.
    spin_output: Literal["sign", "bernoulli"] = "sign"
    # Conditional conv G: the label also scales and shifts every stage's features (FiLM),
    # not only G's input (pipeline.models.gan_nets.ConvGenerator).
    g_film: bool = False
    # Conv G: per-site noise maps added at every stage (StyleGAN's noise inputs); the latent
    # then has latent_dim + (number of sites over all stages) entries, all from latent_prior.
    g_noise_inputs: bool = False
    # Conv G: 3x3 conv + ReLU units per upsampling stage (StyleGAN2 uses 2), each with its own
    # FiLM and noise map; > 1 deepens G at every resolution, the finest included.
    g_convs_per_stage: int = 1
    # Spin lattices: weight of a feature-matching term in G's loss (Salimans et al. 2016,
    # Sec. 3.1) on the lattice observables (pipeline.models.gan_nets.lattice_observables):
    # per label in the batch, an unbiased estimate of the squared distance between the fakes'
    # and the reals' mean bond correlations (so the energy) and m^2 (see observable_matching).
    # With spin_output=bernoulli the fakes' observables are their exact expectations over the
    # draw given G's means (matched_observables), not the drawn lattice's.
    # 0 = off. Logged as g/observable_matching (can be slightly negative: it is unbiased).
    g_observable_matching: float = 0.0
    # Semi-supervised GAN (Salimans et al. 2016, Sec. 5): a K-class discriminator whose implicit
    # (K+1)-th class is "fake". labelled: every training sample's label is used; unlabelled:
    # none; mixed: a fraction labelled_fraction of samples. Needs class labels in the data.
    semi_supervised: Literal["off", "labelled", "unlabelled", "mixed"] = "off"
    labelled_fraction: float = 0.1  # for semi_supervised == "mixed"
    # Samples whose labels are never used for training, for held-out classification accuracy.
    heldout_fraction: float = 0.1
    # Where the latents h (and WGAN-GP's interpolation weights) come from during training.
    # null: each rank's own RNG (seeded by run.seed and the rank). An int: for every optimizer
    # (micro) step the noise of the WHOLE global batch is drawn from a generator keyed by
    # (latent_seed, phase, step, call within the step) and each rank takes its slice, so the
    # noise does not depend on how the global batch is split over processes; with the same
    # data, 2 ranks x B then train exactly like 1 process x 2B (DDP averages gradients).
    latent_seed: int | None = None

    def validate(self) -> None:
        if self.n_critic < 1:
            raise ConfigError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        if self.latent_dim <= 0:
            raise ConfigError(f"gan.latent_dim must be positive, got {self.latent_dim}")
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError(f"gan.lr_g and gan.lr_d must be > 0, got {self.lr_g} and {self.lr_d}")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"gan.betas must lie in [0, 1), got {self.betas}")
        if self.latent_seed is not None and self.latent_seed < 0:
            raise ConfigError(f"gan.latent_seed must be null or a non-negative integer, got {self.latent_seed}")
        if self.gp_weight < 0:
            raise ConfigError(f"gan.gp_weight must be >= 0, got {self.gp_weight}")
        if self.g_convs_per_stage < 1:
            raise ConfigError(f"gan.g_convs_per_stage must be >= 1, got {self.g_convs_per_stage}")
        if self.g_observable_matching < 0:
            raise ConfigError(f"gan.g_observable_matching must be >= 0, got {self.g_observable_matching}")
        if self.r1_weight < 0:
            raise ConfigError(f"gan.r1_weight must be >= 0, got {self.r1_weight}")
        if self.r1_weight > 0 and self.loss not in ("minimax", "non-saturating"):
            raise ConfigError(
                f"gan.r1_weight is the R1 penalty of the logistic losses ('minimax', 'non-saturating'); "
                f"gan.loss={self.loss!r} has its own (wgan-gp: gan.gp_weight)"
            )
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(f"gan.channels must be a non-empty list of positive widths, got {self.channels}")
        if self.semi_supervised != "off":
            if self.conditional:
                raise ConfigError(
                    "gan.semi_supervised needs gan.conditional=false: the K-class discriminator "
                    "classifies real samples itself, G is unconditional (Salimans et al. 2016)"
                )
            if self.loss not in ("minimax", "non-saturating"):
                raise ConfigError(
                    f"gan.semi_supervised needs a logistic loss ('minimax' or 'non-saturating'), "
                    f"got gan.loss={self.loss!r}"
                )
            if not 0.0 < self.heldout_fraction < 1.0:
                raise ConfigError(f"gan.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
            if not 0.0 < self.labelled_fraction <= 1.0 - self.heldout_fraction:
                raise ConfigError(
                    f"gan.labelled_fraction must be in (0, 1 - gan.heldout_fraction = "
                    f"{1.0 - self.heldout_fraction:g}], got {self.labelled_fraction}"
                )


# ---------------------------------------------------------------------------------------
# Losses: logits (or critic scores) in, scalar out.


def d_loss_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-L(G, D) of the seed's game: -E[log D(x)] - E[log(1 - D(G(h)))], D = sigmoid(logit)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_minimax(fake_logits: torch.Tensor) -> torch.Tensor:
    """E[log(1 - D(G(h)))], minimised by G: exactly the seed's game (saturates when D wins)."""
    return -F.softplus(fake_logits).mean()


def g_loss_non_saturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """-E[log D(G(h))]: same fixed point, strong gradients early (Goodfellow et al. 2014, Sec. 3)."""
    return F.softplus(-fake_logits).mean()


def d_loss_wasserstein(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Critic loss E[f(G(h))] - E[f(x)]: minus the Kantorovich-Rubinstein estimate of W1
    (Arjovsky et al. 2017, eq. 3); the Lipschitz constraint comes from the gradient penalty."""
    return fake_scores.mean() - real_scores.mean()


def g_loss_critic(fake_scores: torch.Tensor) -> torch.Tensor:
    """-E[f(G(h))]: generator loss of WGAN and of the hinge GAN (Lim & Ye 2017; Miyato et al. 2018)."""
    return -fake_scores.mean()


def d_loss_hinge(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 - f(x))] + E[max(0, 1 + f(G(h)))] (Lim & Ye 2017, eq. 9)."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def gradient_penalty(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x f(x)||_2 - 1)^2] at ``inputs`` (Gulrajani et al. 2017, eq. 3, without lambda).

    ``scores`` must be f(inputs) computed with ``inputs.requires_grad``; create_graph=True so
    the penalty itself is differentiated w.r.t. the critic's parameters by the outer backward.
    The critic must act on each sample independently (no batch norm) for the gradient of
    sum(scores) to be the per-sample gradient.
    """
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return ((norms - 1.0) ** 2).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """E_real ||grad_x D(x)||_2^2 (Mescheder et al. 2018, eq. 9, without gamma / 2).

    As :func:`gradient_penalty`: ``real_logits`` computed from ``real_inputs`` with
    requires_grad, create_graph=True so the outer backward differentiates the penalty.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()


def ssl_unsupervised_logit(class_logits: torch.Tensor) -> torch.Tensor:
    """Real-vs-fake logit of a K-class discriminator with the fake class's logit fixed at 0.

    Salimans et al. 2016, Sec. 5: p(y = K+1 | x) = 1 / (Z(x) + 1), Z = sum_k exp(l_k), so
    D(x) = 1 - p(K+1 | x) = Z / (Z + 1) = sigmoid(logsumexp_k l_k). The unsupervised loss
    -E_data log D(x) - E_G log(1 - D(G(h))) is then d_loss_logistic of this logit.
    """
    return torch.logsumexp(class_logits, dim=1)


def ssl_supervised_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-E log p(y | x, y < K+1) = cross-entropy over the K real classes (Salimans et al. 2016)."""
    return F.cross_entropy(class_logits, labels.long())


# ---------------------------------------------------------------------------------------
# Outputs


@dataclass
class GANOutput:
    """One phase's loss and balance metrics. Metric fields are detached tensors (no host
    sync in forward); ``None`` fields do not apply to this loss/phase and are not reported.
    Which fields are set depends only on the configuration, so every call of ``metrics()``
    returns the same keys (the loop reduces metrics across ranks key by key)."""

    loss: torch.Tensor
    loss_d: torch.Tensor | None = None
    loss_g: torch.Tensor | None = None
    d_real: torch.Tensor | None = None  # mean D(x): probability (logistic) or raw critic score
    d_fake: torch.Tensor | None = None  # mean D(G(h)), same units
    js_estimate: torch.Tensor | None = None  # (L(G, D) + log 4) / 2, logistic losses
    wasserstein_estimate: torch.Tensor | None = None  # E f(x) - E f(G(h)), critics
    gradient_penalty: torch.Tensor | None = None  # without gp_weight
    fake_detected_fraction: torch.Tensor | None = None
    real_detected_fraction: torch.Tensor | None = None
    # 1.0 / 0.0; logistic losses only: a critic's G loss -E f(G(h)) is linear in the score
    # and never saturates, so "D wins" does not starve G of gradient there.
    d_dominates: torch.Tensor | None = None
    diversity_ratio: torch.Tensor | None = None  # mean pairwise distance, fakes / reals
    observable_matching: torch.Tensor | None = None  # G's feature-matching term, without its weight
    g_collapsed: torch.Tensor | None = None  # 1.0 / 0.0
    # Semi-supervised: supervised loss and per-batch counts of correct classifications. The
    # loop averages metrics over steps, so the pooled accuracy is *_correct / *_count (a
    # per-batch ratio would be undefined for a batch without held-out samples).
    loss_supervised: torch.Tensor | None = None
    labelled_correct: torch.Tensor | None = None
    labelled_count: torch.Tensor | None = None
    heldout_correct: torch.Tensor | None = None
    heldout_count: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        items = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "loss"]
        items = [(k, v) for k, v in items if v is not None]
        # one device-to-host copy for all metrics instead of one sync per metric
        values = torch.stack([v.detach().float().reshape(()) for _, v in items]).tolist() if items else []
        return {k: float(v) for (k, _), v in zip(items, values)}


# ---------------------------------------------------------------------------------------
# Data space <-> model space


class _DataMap:
    """Spins are already +-1; levels 0..L-1 map affinely onto [-1, 1]; continuous as is."""

    def __init__(self, meta: DataMeta):
        self.kind = meta.data_kind
        self.num_levels = meta.num_levels
        if self.kind == "levels" and (self.num_levels is None or self.num_levels < 2):
            raise ValueError(f"data_kind 'levels' needs num_levels >= 2, got {self.num_levels}")

    @property
    def bounded(self) -> bool:
        return self.kind in ("spins", "levels")

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "levels":
            return x * (2.0 / (self.num_levels - 1)) - 1.0
        return x

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space generator output -> data space (a hard decision for discrete data)."""
        if self.kind == "spins":
            return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        if self.kind == "levels":
            return ((y + 1.0) * (0.5 * (self.num_levels - 1))).round().clamp(0, self.num_levels - 1)
        return y


# Which lattice_observables are matched: the correlations c1, c_diag, c2 and m^2 - all sums of
# products of spins, so their expectations over gan.spin_output=bernoulli's independent draws
# are exact functions of G's means (matched_observables). c1^2 and |m| are not. (Measured: at
# weight 30 this subset did slightly better than all six on two seeds, docs/model_zoo.md.)
MATCHED_OBSERVABLES = (0, 2, 3, 5)


def matched_observables(x: torch.Tensor, spin_means: bool = False) -> torch.Tensor:
    """[B, 1, H, W] lattices -> [B, 4]: c1, c_diag, c2 and m^2 (MATCHED_OBSERVABLES of
    lattice_observables). ``spin_means``: x holds the means y of independent +-1 spins
    (gan.spin_output=bernoulli) and the result is the observables' exact expectation over
    the draw: a product of distinct sites averages to the product of the means
    (E s_i s_j = y_i y_j; the lattice is periodic and > 2 sites wide, so the correlations pair
    distinct sites), and m^2 adds its i = j terms, s_i^2 = 1: E m^2 = m(y)^2 + (1 - mean y^2) / N.
    Differentiating this expectation instead of the drawn lattice's observables through the
    straight-through estimator is Rao-Blackwellisation: no draw noise, and no bias from m^2's
    i = j terms, whose straight-through gradient 2 s_i has mean 2 y_i where the exact one is 0
    (it shrinks |y| - more disordered lattices - the more weight the matching has)."""
    from pipeline.models.gan_nets import lattice_observables

    obs = lattice_observables(x)[:, MATCHED_OBSERVABLES]
    if not spin_means:
        return obs
    assert min(x.shape[2:]) > 2, "distance-2 correlations of a lattice <= 2 wide pair a site with itself"
    n_sites = x.shape[2] * x.shape[3]
    m2 = obs[:, 3] + (1.0 - (x * x).mean(dim=(1, 2, 3))) / n_sites
    return torch.cat([obs[:, :3], m2[:, None]], dim=1)


def observable_matching(fake_obs: torch.Tensor, real_obs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per label in the batch (all samples if ``labels`` is None), an unbiased estimate of
    ||E obs(fake) - E obs(real)||^2 from per-sample observables [B, k] (matched_observables):
    the squared MMD with a linear kernel (Gretton et al. 2012, eq. 3), sums over pairs
    i != j only, weighted by the label's share of the batch; labels with fewer than 2 samples
    add nothing. The plain squared gap of the batch means would add Var(mean of the fakes)
    and so reward G for shrinking its observables' fluctuations (the specific heat and
    susceptibility) by O(1/group size). Fakes and reals are paired by label (the fakes are
    drawn with the real batch's labels). Computed on each rank's share of the batch: being
    quadratic in the samples, it is not split-invariant, so 2 ranks x B train close to, not
    exactly like, 1 process x 2B."""
    assert fake_obs.shape == real_obs.shape and fake_obs.dim() == 2, (fake_obs.shape, real_obs.shape)
    f, r = fake_obs, real_obs
    groups = [torch.ones(len(f), dtype=torch.bool, device=f.device)] if labels is None else \
        [labels == value for value in labels.unique()]
    total = torch.zeros((), device=f.device)
    for sel in groups:
        n = int(sel.sum())
        if n < 2:
            continue
        fs, rs = f[sel], r[sel]

        def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # mean over i != j of a_i . b_j
            return ((a.sum(0) * b.sum(0)).sum() - (a * b).sum()) / (n * (n - 1))

        mmd2 = pairs(fs, fs) + pairs(rs, rs) - 2 * pairs(fs, rs)
        total = total + (n / len(f)) * mmd2
    return total


def _latent_dim(G: nn.Module, cfg: GANConfig) -> int:
    """Entries of G's input h: G.latent_dim where G declares it (a conv G with per-site noise
    maps, gan.g_noise_inputs, needs more than gan.latent_dim), else gan.latent_dim (any G)."""
    return int(getattr(G, "latent_dim", cfg.latent_dim))


def _draw_spins(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """+-1 spins with mean y: +1 where u < (1 + y) / 2, for u ~ U(0, 1) of y's shape."""
    return torch.where(u < (1.0 + y.float()) / 2.0, 1.0, -1.0).to(y.dtype)


class _Unregistered:
    """Holds a module without registering it as a submodule (not in parameters(),
    state_dict() or DDP's reducer), and is shared rather than copied by ``copy.deepcopy``:
    the EMA copy of GStep must average G and keep pointing at the live D."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> "_Unregistered":
        return self


def sample_latent(num_samples: int, latent_dim: int, prior: str, device: torch.device | str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """h ~ U(-1, 1)^d (the seed's prior) or N(0, I). Drawn on the generator's device (CPU
    generators are how samplers make seeded draws) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    if prior == "uniform":
        h = torch.rand(num_samples, latent_dim, device=gen_device, generator=generator) * 2.0 - 1.0
    elif prior == "normal":
        h = torch.randn(num_samples, latent_dim, device=gen_device, generator=generator)
    else:
        raise ValueError(f"latent prior must be 'uniform' or 'normal', got {prior!r}")
    return h.to(device)


def _param_dtype(module: nn.Module) -> torch.dtype:
    """Dtype a network's inputs must have: float32 normally (autocast casts inside), bf16/fp16
    when a backend (DeepSpeed bf16/fp16) has converted the parameters themselves."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    x = x[:DIVERSITY_MAX_SAMPLES].flatten(1).float()
    n = x.shape[0]
    if n < 2:
        return x.new_tensor(float("nan"))
    return torch.cdist(x, x).sum() / (n * (n - 1))


def _content_uniform(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """A per-sample number in [0, 1) that is a fixed function of the sample's content.

    Decides which samples are labelled / held out in semi-supervised training. A function of
    the content (not of the position in the batch) keeps the split the same for a sample
    across epochs, shuffles, ranks and resumes without needing sample ids from the stream:
    frac(<x, w>) with w a fixed pseudo-random vector, in float64 so that identical inputs
    give identical fractions.
    """
    flat = x.detach().flatten(1).to(torch.float64)
    key = (flat.shape[1], flat.device)
    if key not in cache:
        g = torch.Generator().manual_seed(20160610)  # fixed: the split must never change
        cache[key] = (torch.rand(flat.shape[1], generator=g, dtype=torch.float64) * 97.0 + 3.0).to(flat.device)
    v = flat @ cache[key]
    return torch.frac(v.abs())


@dataclass
class _Noise:
    """A generator for one call's noise (None: the global RNG) and this rank's place in the
    global batch: noise for ``world_size * n`` samples is drawn, rank ``r`` uses rows
    ``[r * n, (r + 1) * n)``, the same rows its data occupy in the global batch's gradient mean."""

    generator: torch.Generator | None
    rank: int
    world_size: int

    def slice(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.rank * n:(self.rank + 1) * n]


# ---------------------------------------------------------------------------------------
# Phases


class _GANStep(nn.Module):
    """What both phases share: the config, the data map, the prior and the label handling."""

    def __init__(self, cfg: GANConfig, meta: DataMeta):
        super().__init__()
        self.cfg = cfg
        self.meta = meta
        self.data_map = _DataMap(meta)
        self.conditional = cfg.conditional
        self.ssl = cfg.semi_supervised != "off"
        self.critic = cfg.loss in ("wgan-gp", "hinge")
        self._noise_step, self._noise_calls = -1, 0

    def _labels(self, batch: dict) -> torch.Tensor | None:
        """Labels for G and D: the real batch's labels, so fakes share the data's label
        distribution, and real and fake samples in D's input are paired by label."""
        if not self.conditional:
            return None
        if "label" not in batch:
            raise ValueError("gan.conditional=true but the batch has no 'label' (set data.label_key)")
        return batch["label"]

    def _noise(self, ctx: StepContext | None) -> "_Noise":
        """This call's noise source: the rank's RNG, or (gan.latent_seed) a slice of the
        global batch's noise drawn from a keyed generator."""
        if self.cfg.latent_seed is None or ctx is None:
            return _Noise(None, 0, 1)
        # Calls within one loop step (n_critic repeats x grad_accum micro steps) are numbered
        # in order; the count restarts every step, so a resumed run draws the same noise.
        if ctx.step != self._noise_step:
            self._noise_step, self._noise_calls = ctx.step, 0
        key = [self.cfg.latent_seed, self._phase_id, ctx.step, self._noise_calls]
        self._noise_calls += 1
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
        return _Noise(torch.Generator().manual_seed(seed), ctx.rank, ctx.world_size)

    def _latent(self, n: int, device: torch.device, G: nn.Module, noise: "_Noise") -> torch.Tensor:
        dim = _latent_dim(G, self.cfg)
        if noise.generator is None:
            h = sample_latent(n, dim, self.cfg.latent_prior, device)
        else:
            h = noise.slice(sample_latent(n * noise.world_size, dim, self.cfg.latent_prior,
                                          "cpu", noise.generator), n).to(device)
        return h.to(_param_dtype(G))

    def _spins(self, y: torch.Tensor, noise: "_Noise") -> torch.Tensor:
        """G's output as D sees it: y itself, or (gan.spin_output=bernoulli) +-1 spins drawn
        with mean y, carrying y's gradient straight through."""
        if self.cfg.spin_output != "bernoulli":
            return y
        n, g = y.shape[0], noise.generator
        if g is None:
            u = torch.rand(y.shape, device=y.device)
        else:
            u = noise.slice(torch.rand((n * noise.world_size, *y.shape[1:]), generator=g, device=g.device), n)
        # s + (y - y.detach()): exactly s forward (y + (s - y) is not, in floating point), dy backward
        return _draw_spins(y.detach(), u.to(y.device)) + (y - y.detach())

    def _real_fake_logit(self, d_out: torch.Tensor) -> torch.Tensor:
        # float32 before the losses: under autocast D's output may be bf16/fp16.
        d_out = d_out.float()
        return ssl_unsupervised_logit(d_out) if self.ssl else d_out.squeeze(1)


class DStep(_GANStep):
    """D's phase: one forward of D on [real, fake(, interpolates)], D's loss."""

    _phase_id = 0  # keys the noise of gan.latent_seed

    def __init__(self, D: nn.Module, G: nn.Module, cfg: GANConfig, meta: DataMeta):
        super().__init__(cfg, meta)
        self.D = D
        self._g = _Unregistered(G)
        self._split_cache: dict = {}

    @property
    def G(self) -> nn.Module:
        return self._g.module

    def forward(self, batch: dict, ctx: StepContext | None = None) -> GANOutput:
        real = self.data_map.to_model(batch["x"]).to(_param_dtype(self.D))
        n = real.shape[0]
        labels = self._labels(batch)
        noise = self._noise(ctx)
        with torch.no_grad():  # G is frozen in this phase; no graph through it
            fake = self._spins(self.G(self._latent(n, real.device, self.G, noise), labels), noise).to(real.dtype)

        use_gp = self.cfg.loss == "wgan-gp" and torch.is_grad_enabled()
        use_r1 = self.cfg.r1_weight > 0 and not self.critic
        if use_r1 and torch.is_grad_enabled():
            real = real.detach().requires_grad_(True)
        parts = [real, fake]
        if use_gp:
            # Random points on straight lines between paired real and fake samples (eq. 3).
            shape = (n, *([1] * (real.dim() - 1)))
            if noise.generator is None:
                eps = torch.rand(shape, device=real.device, dtype=real.dtype)
            else:
                eps = noise.slice(torch.rand((n * noise.world_size, *shape[1:]), generator=noise.generator), n)
                eps = eps.to(real.device, real.dtype)
            interp = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
            parts.append(interp)
        # ONE forward of D for real, fake and interpolates: DDP and DeepSpeed expect one
        # forward per backward, and each extra call would also re-run spectral-norm power
        # iterations. D acts per sample (no batch norm), so concatenation changes nothing.
        d_labels = None if labels is None else torch.cat([labels] * len(parts))
        out = self.D(torch.cat(parts), d_labels)
        real_out, fake_out = out[:n], out[n:2 * n]
        r, f = self._real_fake_logit(real_out), self._real_fake_logit(fake_out)

        o = GANOutput(loss=torch.zeros((), device=real.device))
        if self.critic:
            loss = d_loss_wasserstein(r, f) if self.cfg.loss == "wgan-gp" else d_loss_hinge(r, f)
            o.d_real, o.d_fake = r.mean().detach(), f.mean().detach()
            # W1 estimate for the (approximately 1-Lipschitz) WGAN-GP critic; for hinge the
            # same mean-score gap, a W1 estimate only up to D's Lipschitz constant.
            o.wasserstein_estimate = (r.mean() - f.mean()).detach()
            if self.cfg.loss == "wgan-gp":
                # A critic's scores are shift-invariant, so "classified as fake" means scored
                # below the midpoint of the mean real and mean fake scores.
                threshold = 0.5 * (r.mean() + f.mean()).detach()
            else:
                threshold = torch.zeros((), device=r.device)  # hinge margins are at +-1 around 0
            o.fake_detected_fraction = (f < threshold).float().mean().detach()
            o.real_detected_fraction = (r >= threshold).float().mean().detach()
            if self.cfg.loss == "wgan-gp":
                if use_gp:
                    # autograd.grad on the *unscaled* critic output: the penalty is in true
                    # units whatever loss scale the loop's GradScaler (fp16) applies later to
                    # the total loss, so nothing here must be unscaled. Under fp16 the input
                    # gradients themselves can underflow; prefer bf16 for WGAN-GP.
                    gp = gradient_penalty(out[2 * n:].float(), interp)
                    loss = loss + self.cfg.gp_weight * gp
                    o.gradient_penalty = gp.detach()
                else:  # evaluation without autograd: report the penalty as not computed
                    o.gradient_penalty = torch.full((), float("nan"), device=real.device)
        else:
            loss = d_loss_logistic(r, f)
            # L(G, D) = -d_loss_logistic; JS >= (L + log 4) / 2, tight at D* (Thm. 1).
            o.js_estimate = ((-loss + LOG4) / 2).detach()
            o.d_real = torch.sigmoid(r).mean().detach()
            o.d_fake = torch.sigmoid(f).mean().detach()
            o.fake_detected_fraction = (f < 0).float().mean().detach()
            o.real_detected_fraction = (r >= 0).float().mean().detach()
            o.d_dominates = (o.d_fake < D_DOMINATES_FAKE_PROB).float()
            if use_r1:
                if real.requires_grad:
                    r1 = r1_penalty(r, real)
                    loss = loss + 0.5 * self.cfg.r1_weight * r1
                    o.gradient_penalty = r1.detach()
                else:  # evaluation without autograd
                    o.gradient_penalty = torch.full((), float("nan"), device=real.device)
        o.loss_d = loss.detach()

        if self.ssl:
            loss = loss + self._ssl_terms(batch, real_out.float(), o)

        with torch.no_grad():
            o.diversity_ratio = _mean_pairwise_distance(fake) / _mean_pairwise_distance(real)
            o.g_collapsed = (o.diversity_ratio < G_COLLAPSED_DIVERSITY_RATIO).float()
        o.loss = loss
        return o

    def _ssl_terms(self, batch: dict, class_logits: torch.Tensor, o: GANOutput) -> torch.Tensor:
        """Supervised loss on the labelled samples, counts for accuracy (Salimans et al. 2016)."""
        if "label" not in batch:
            raise ValueError("gan.semi_supervised needs class labels in the batch ('label'; set data.label_key)")
        y = batch["label"].long()
        u = _content_uniform(batch["x"], self._split_cache)
        heldout = u >= 1.0 - self.cfg.heldout_fraction
        mode = self.cfg.semi_supervised
        if mode == "labelled":
            labelled = ~heldout
        elif mode == "mixed":
            labelled = u < self.cfg.labelled_fraction  # disjoint from held-out (validated)
        else:  # unlabelled: the labels only measure accuracy
            labelled = torch.zeros_like(heldout)
        correct = class_logits.argmax(dim=1) == y
        o.labelled_correct = (correct & labelled).sum().float()
        o.labelled_count = labelled.sum().float()
        o.heldout_correct = (correct & heldout).sum().float()
        o.heldout_count = heldout.sum().float()
        # Mean over the labelled samples of this batch; zero (with a graph) if there are none,
        # so every rank runs the same backward.
        ce = F.cross_entropy(class_logits, y, reduction="none")
        sup = (ce * labelled).sum() / labelled.sum().clamp(min=1)
        o.loss_supervised = sup.detach()
        return sup

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Semi-supervised D's class logits [B, K] for data-space samples x."""
        if not self.ssl:
            raise ValueError("classify() needs gan.semi_supervised != 'off'")
        return self.D(self.data_map.to_model(x).to(_param_dtype(self.D))).float()


class GStep(_GANStep):
    """G's phase: G's loss through the frozen D; ``sample`` draws data-space samples."""

    _phase_id = 1

    def __init__(self, G: nn.Module, D: nn.Module, cfg: GANConfig, meta: DataMeta):
        super().__init__(cfg, meta)
        self.G = G
        self._d = _Unregistered(D)
        self._warned_labels = False

    @property
    def D(self) -> nn.Module:
        return self._d.module

    def forward(self, batch: dict, ctx: StepContext | None = None) -> GANOutput:
        n = batch["x"].shape[0]
        device = batch["x"].device
        labels = self._labels(batch)
        noise = self._noise(ctx)
        # tanh output for discrete data: differentiable (through the draw with spin_output=bernoulli)
        y = self.G(self._latent(n, device, self.G, noise), labels)
        fake = self._spins(y, noise)
        f = self._real_fake_logit(self.D(fake.to(_param_dtype(self.D)), labels))
        if self.cfg.loss == "minimax":
            loss = g_loss_minimax(f)
        elif self.cfg.loss == "non-saturating":
            loss = g_loss_non_saturating(f)
        else:
            loss = g_loss_critic(f)
        o = GANOutput(loss=loss, loss_g=loss.detach())
        o.d_fake = (f if self.critic else torch.sigmoid(f)).mean().detach()
        if self.cfg.g_observable_matching > 0:
            real = self.data_map.to_model(batch["x"]).float()
            # y is what D sees (spin_output=sign) or the drawn spins' means (bernoulli)
            fm = observable_matching(matched_observables(y.float(), spin_means=self.cfg.spin_output == "bernoulli"),
                                     matched_observables(real), labels)
            o.loss = loss + self.cfg.g_observable_matching * fm
            o.observable_matching = fm.detach()
        return o

    @torch.no_grad()
    def sample(self, num_samples: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` samples in data space: +-1 spins (sign of tanh, or drawn with mean
        tanh for gan.spin_output=bernoulli), levels
        0..L-1 (rounded), or raw continuous values. Conditional G: ``labels`` [num_samples]
        (class indices or e.g. temperatures); None draws classes uniformly / cycles over the
        data's label values."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        device = next(self.G.parameters()).device
        if self.conditional:
            labels = self._sample_labels(num_samples, labels, generator).to(device)
        elif labels is not None:
            # The loop's default labels come from the data's label kind, also for unconditional
            # GANs on labelled data (e.g. semi-supervised): they cannot be honoured, say so once.
            if not self._warned_labels:
                warnings.warn("unconditional GAN: labels passed to sample() are ignored", stacklevel=2)
                self._warned_labels = True
            labels = None
        h = sample_latent(num_samples, _latent_dim(self.G, self.cfg), self.cfg.latent_prior, device, generator)
        y = self._spins(self.G(h.to(_param_dtype(self.G)), labels).float(), _Noise(generator, 0, 1))
        return self.data_map.to_data(y)

    def _sample_labels(self, n: int, labels: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        m = self.meta
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
            if m.label_kind == "class":
                if labels.dtype.is_floating_point or not bool(((labels >= 0) & (labels < m.num_classes)).all()):
                    raise ValueError(f"class labels must be integers in 0..{m.num_classes - 1}")
                return labels.long()
            return labels.float()
        if m.label_kind == "class":
            return torch.randint(0, m.num_classes, (n,), generator=generator)
        if not m.label_values:
            raise ValueError("this GAN is conditional on a continuous label: pass labels (e.g. temperatures)")
        values = torch.tensor(m.label_values, dtype=torch.float32)
        return values[torch.arange(n) % len(values)]


def build_nets(cfg: GANConfig, meta: DataMeta) -> tuple[nn.Module, nn.Module]:
    """(G, D) for this config and data, after checking they fit together."""
    from pipeline.models.gan_nets import build_gan_nets

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


def build_phases(cfg: GANConfig, meta: DataMeta, betas: tuple[float, float]) -> list:
    """[D phase (n_critic steps, G frozen), G phase (EMA'd, D frozen)]."""
    from pipeline.train.phases import Phase

    cfg.validate()
    G, D = build_nets(cfg, meta)
    b = tuple(cfg.betas) if cfg.betas is not None else tuple(betas)
    return [
        Phase(name="d", module=DStep(D, G, cfg, meta), lr=cfg.lr_d, betas=b, repeats=cfg.n_critic, frozen=[G]),
        Phase(name="g", module=GStep(G, D, cfg, meta), lr=cfg.lr_g, betas=b, ema=True, frozen=[D]),
    ]
