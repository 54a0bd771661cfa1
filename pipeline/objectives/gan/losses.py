"""The GAN's losses: small callables of D's logits (or critic scores) -> a scalar.

The logistic losses of the seed's game and the non-saturating G loss (Goodfellow et al.
2014), the Wasserstein critic loss (Arjovsky et al. 2017) and its gradient penalty
(Gulrajani et al. 2017), the hinge loss (Lim & Ye 2017), the R1 penalty (Mescheder et al.
2018) and the semi-supervised terms of a K-class discriminator (Salimans et al. 2016).
Written with softplus / logsigmoid so they are finite for any logit:
log sigmoid(l) = -softplus(-l) and log(1 - sigmoid(l)) = -softplus(l).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
