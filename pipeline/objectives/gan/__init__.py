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

The package, one concept a module: :mod:`.config` (``GANConfig``, torch-free), :mod:`.losses`
(small functions of logits or critic scores, written with softplus / logsigmoid so they are
finite for any logit: log sigmoid(l) = -softplus(-l) and log(1 - sigmoid(l)) = -softplus(l)),
:mod:`.matching` (observable matching on spin lattices), :mod:`.noise` (the random draws and
gan.latent_seed's split-invariant noise), :mod:`.balance` (the balance flags),
:mod:`.nets` (G and D for a config and data; data space <-> [-1, 1] is the shared
:class:`pipeline.objectives.data_space.DataSpace`; the networks live in
:mod:`pipeline.models.gan_nets`) and :mod:`.phases` (``DStep``, ``GStep``, ``build_phases``).

Phases (see :func:`build_phases`): ``DStep`` owns D and trains it against a frozen G;
``GStep`` owns G and trains it through a frozen D. Each holds the other network without
registering it, so DDP / optimizers / ZeRO of a phase see only that phase's parameters.
"""

from __future__ import annotations

from pipeline.lazy import lazy_exports

# Public name -> the submodule that defines it. Imported on first access (PEP 562) so that
# ``pipeline.objectives.gan.config`` (parsed by pipeline.config for every command) stays
# free of torch: importing a submodule runs this package's __init__ first.
_EXPORTS = {
    "GANConfig": "config",
    **{name: "losses" for name in (
        "d_loss_hinge", "d_loss_logistic", "d_loss_wasserstein", "g_loss_critic", "g_loss_minimax",
        "g_loss_non_saturating", "gradient_penalty", "r1_penalty", "ssl_supervised_loss",
        "ssl_unsupervised_logit",
    )},
    "MATCHED_OBSERVABLES": "matching",
    "matched_observables": "matching",
    "observable_matching": "matching",
    "sample_latent": "noise",
    "build_nets": "nets",
    "GANOutput": "phases",
    "DStep": "phases",
    "GStep": "phases",
    "build_phases": "phases",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
