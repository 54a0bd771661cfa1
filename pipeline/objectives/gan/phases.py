"""The GAN's two phases: ``DStep`` (D's loss) and ``GStep`` (G's loss, sampling).

Phases (see :func:`build_phases`): ``DStep`` owns D and trains it against a frozen G;
``GStep`` owns G and trains it through a frozen D. Each holds the other network without
registering it, so DDP / optimizers / ZeRO of a phase see only that phase's parameters.
Each phase's forward returns a :class:`GANOutput`: the loss and the balance metrics.

G and D are called with float32 inputs whatever the backend; a backend that stores the
weights themselves in bf16/fp16 casts inputs where they meet them (``train/engines/half_weights.py``).
G declares ``latent_dim``, the entries of its input h (more than gan.latent_dim for a conv G
with per-site noise maps, gan.g_noise_inputs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.meta import DataMeta
from pipeline.objectives.base import Objective, SampledObjective, StepContext
from pipeline.objectives.gan.balance import D_DOMINATES_FAKE_PROB, LOG4, diversity_balance
from pipeline.objectives.gan.config import GANConfig
from pipeline.objectives.data_space import DataSpace
from pipeline.objectives.gan.losses import (
    d_loss_hinge,
    d_loss_logistic,
    d_loss_wasserstein,
    g_loss_critic,
    g_loss_minimax,
    g_loss_non_saturating,
    gradient_penalty,
    r1_penalty,
    ssl_unsupervised_logit,
)
from pipeline.objectives.gan.matching import matched_observables, observable_matching
from pipeline.objectives.gan.nets import build_nets
from pipeline.objectives.gan.noise import _content_uniform, _draw_spins, _Noise, sample_latent


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


class _Unregistered:
    """Holds a module without registering it as a submodule (not in parameters(),
    state_dict() or DDP's reducer), and is shared rather than copied by ``copy.deepcopy``:
    the EMA copy of GStep must average G and keep pointing at the live D."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> "_Unregistered":
        return self


class _GANStep(Objective):
    """What both phases share: the config, the data map, the prior and the label handling."""

    def __init__(self, cfg: GANConfig, meta: DataMeta):
        super().__init__()
        self.cfg = cfg
        self.meta = meta
        self.data_map = DataSpace(meta)
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
        return _Noise.keyed(key, ctx.rank, ctx.world_size)

    def _latent(self, n: int, device: torch.device, G: nn.Module, noise: "_Noise") -> torch.Tensor:
        return noise.latent(n, G.latent_dim, self.cfg.latent_prior, device)

    def _spins(self, y: torch.Tensor, noise: "_Noise") -> torch.Tensor:
        """G's output as D sees it: y itself, or (gan.spin_output=bernoulli) +-1 spins drawn
        with mean y, carrying y's gradient straight through."""
        if self.cfg.spin_output != "bernoulli":
            return y
        u = noise.uniform(y.shape, y.device)
        # s + (y - y.detach()): exactly s forward (y + (s - y) is not, in floating point), dy backward
        return _draw_spins(y.detach(), u) + (y - y.detach())

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
        real = self.data_map.to_model(batch["x"])
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
            parts.append(self._interpolates(real, fake, noise))
        # ONE forward of D for real, fake and interpolates: DDP and DeepSpeed expect one
        # forward per backward, and each extra call would also re-run spectral-norm power
        # iterations. D acts per sample (no batch norm), so concatenation changes nothing;
        # gan.d_minibatch_std's groups are consecutive samples and its group size divides n
        # (Config.validate), so no group mixes real, fake and interpolates. With it, the
        # gradient penalty's per-sample gradient also carries the group's other members'
        # scores' dependence on that sample, as in ProGAN (Karras et al. 2018), which used both.
        d_labels = None if labels is None else torch.cat([labels] * len(parts))
        out = self.D(torch.cat(parts), d_labels)
        real_out, fake_out = out[:n], out[n:2 * n]
        r, f = self._real_fake_logit(real_out), self._real_fake_logit(fake_out)

        o = GANOutput(loss=torch.zeros((), device=real.device))
        if self.critic:
            gp_at = (out[2 * n:], parts[2]) if use_gp else None
            loss = self._critic_loss(r, f, gp_at, o)
        else:
            loss = self._logistic_loss(r, f, real if use_r1 else None, o)
        o.loss_d = loss.detach()

        if self.ssl:
            loss = loss + self._ssl_terms(batch, real_out.float(), o)

        with torch.no_grad():
            o.diversity_ratio, o.g_collapsed = diversity_balance(fake, real)
        o.loss = loss
        return o

    def _interpolates(self, real: torch.Tensor, fake: torch.Tensor, noise: _Noise) -> torch.Tensor:
        """Random points on straight lines between paired real and fake samples (Gulrajani et
        al. 2017, eq. 3), with requires_grad for the gradient penalty."""
        eps = noise.uniform((real.shape[0], *([1] * (real.dim() - 1))), real.device, real.dtype)
        if self.cfg.d_sign_symmetric:
            # D(-x) = D(x): each fake flipped to its real's side is the same point for D, and the
            # straight line to it stays near the mode both lie in (gan.d_sign_symmetric).
            agree = (real * fake).flatten(1).sum(1) >= 0
            fake = torch.where(agree.reshape(eps.shape), fake, -fake)
        return (eps * real + (1.0 - eps) * fake).requires_grad_(True)

    def _critic_loss(self, r: torch.Tensor, f: torch.Tensor, gp_at: tuple[torch.Tensor, torch.Tensor] | None,
                     o: GANOutput) -> torch.Tensor:
        """WGAN-GP's or the hinge loss of critic scores ``r``, ``f`` (with the gradient penalty
        at ``gp_at`` = (D's scores at the interpolates, the interpolates) where computed);
        fills ``o``'s balance metrics."""
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
            if gp_at is not None:
                # autograd.grad on the *unscaled* critic output: the penalty is in true
                # units whatever loss scale the loop's GradScaler (fp16) applies later to
                # the total loss, so nothing here must be unscaled. Under fp16 the input
                # gradients themselves can underflow; prefer bf16 for WGAN-GP.
                interp_scores, interp = gp_at
                gp = gradient_penalty(interp_scores.float(), interp)
                loss = loss + self.cfg.gp_weight * gp
                o.gradient_penalty = gp.detach()
            else:  # evaluation without autograd: report the penalty as not computed
                o.gradient_penalty = torch.full((), float("nan"), device=r.device)
        return loss

    def _logistic_loss(self, r: torch.Tensor, f: torch.Tensor, r1_at: torch.Tensor | None,
                       o: GANOutput) -> torch.Tensor:
        """The seed game's D loss of logits ``r``, ``f`` (plus gan.r1_weight's R1 penalty at
        the real inputs ``r1_at`` where given); fills ``o``'s balance metrics."""
        loss = d_loss_logistic(r, f)
        # L(G, D) = -d_loss_logistic; JS >= (L + log 4) / 2, tight at D* (Thm. 1).
        o.js_estimate = ((-loss + LOG4) / 2).detach()
        o.d_real = torch.sigmoid(r).mean().detach()
        o.d_fake = torch.sigmoid(f).mean().detach()
        o.fake_detected_fraction = (f < 0).float().mean().detach()
        o.real_detected_fraction = (r >= 0).float().mean().detach()
        o.d_dominates = (o.d_fake < D_DOMINATES_FAKE_PROB).float()
        if r1_at is not None:
            if r1_at.requires_grad:
                r1 = r1_penalty(r, r1_at)
                loss = loss + 0.5 * self.cfg.r1_weight * r1
                o.gradient_penalty = r1.detach()
            else:  # evaluation without autograd
                o.gradient_penalty = torch.full((), float("nan"), device=r.device)
        return loss

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
        return self.D(self.data_map.to_model(x)).float()


class GStep(_GANStep, SampledObjective):
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
        f = self._real_fake_logit(self.D(fake, labels))
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

    def check_sample_options(self, num_steps: int | None, sampler) -> None:
        if num_steps is not None:
            raise ValueError(f"num_steps={num_steps}: --num-steps applies to VDM samplers; "
                             f"a GAN's generator samples in one pass")
        if sampler is not None:
            raise ValueError("--sampler/--eta/--grid apply to VDM samplers; a GAN's generator samples in one "
                             "forward pass (no steps, no noise schedule)")

    @torch.no_grad()
    def sample(self, num_samples: int, labels: torch.Tensor | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, sampler=None) -> torch.Tensor:
        """``num_samples`` samples in data space: +-1 spins (sign of tanh, or drawn with mean
        tanh for gan.spin_output=bernoulli), levels
        0..L-1 (rounded), or raw continuous values. Conditional G: ``labels`` [num_samples]
        (class indices or e.g. temperatures); None draws classes uniformly / cycles over the
        data's label values. ``num_steps`` and ``sampler`` must be None: G samples in one pass."""
        self.check_sample_options(num_steps, sampler)  # G samples in one pass: both must be None
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
        h = sample_latent(num_samples, self.G.latent_dim, self.cfg.latent_prior, device, generator)
        y = self._spins(self.G(h, labels).float(), _Noise(generator, 0, 1))
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
