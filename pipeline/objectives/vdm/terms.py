"""The terms of the VDM's negative ELBO, in nats per sample, as functions of tensors.

The derivation and notation are in the package docstring (:mod:`pipeline.objectives.vdm`):
Luo 2022 eq. 58 (denoising matching) and eq. 45 (consistency), Kingma et al. 2021 eq. 13
(a discrete diffusion term in gamma) and eq. 17 (continuous time). Every helper is written
in terms of gamma = -log SNR of a variance-preserving process. The estimators that need the
network take it as ``eps_model(z, gamma) -> eps_hat`` (labels already bound), so that this
module knows nothing of conditioning or of the module that holds the weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, gamma) -> eps_hat

# ---------------------------------------------------------------------------------------
# Gaussian helpers (all in terms of gamma = -log SNR of a variance-preserving process)


def alpha_sq(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-gamma)


def sigma_sq(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(gamma)


def log_sigma_sq(gamma: torch.Tensor) -> torch.Tensor:
    return -F.softplus(-gamma)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample [B] (or scalar) -> broadcastable against [B, *shape]."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() else v


def sum_dims(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def noisy_latent(x0: torch.Tensor, gamma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = alpha x_0 + sigma eps ~ q(z_gamma | x_0) (Kingma et al. 2021 sec. 3.1-3.2); gamma per sample or scalar."""
    return bcast(alpha_sq(gamma).sqrt(), x0) * x0 + bcast(sigma_sq(gamma).sqrt(), x0) * eps


def reverse_mean_var(
    z_t: torch.Tensor, g_t: torch.Tensor, g_s: torch.Tensor, eps_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)), s < t (Kingma et al. App. A),
    with x_hat given through the network's ``eps_hat`` at (z_t, g_t)."""
    c = -torch.expm1(g_s - g_t)  # 1 - SNR(t)/SNR(s)
    ratio = (alpha_sq(g_s) / alpha_sq(g_t)).sqrt()
    mean = bcast(ratio, z_t) * (z_t - bcast(sigma_sq(g_t).sqrt() * c, z_t) * eps_hat)
    var = bcast(sigma_sq(g_s) * c, z_t).expand_as(z_t)
    return mean, var


# ---------------------------------------------------------------------------------------
# Reconstruction and prior matching (Luo eq. 58; eq. 45 for the consistency prior)


def reconstruction_nats(
    x0: torch.Tensor,
    gamma_0: torch.Tensor,
    eps: torch.Tensor,
    values: torch.Tensor | None,
    value_index: torch.Tensor | None,
) -> torch.Tensor:
    """-log p(x_0 | z_1) at z_1 = alpha_1 x_0 + sigma_1 eps (one-sample estimate), per sample.

    ``values``: the decoder's allowed values in model space (None: Gaussian decoder);
    ``value_index``: the index of each entry of x_0 among them (discrete decoders only).
    """
    a = alpha_sq(gamma_0).sqrt()
    s2 = sigma_sq(gamma_0)
    z = a * x0 + s2.sqrt() * eps
    if values is None:
        # Gaussian decoder N(x; z / alpha, sigma^2 / alpha^2): log-density in data units.
        var = s2 / a**2
        return sum_dims(0.5 * ((x0 - z / a) ** 2 / var + torch.log(2 * math.pi * var)))
    # Discrete decoder (Kingma et al. 2021 sec. 3.3): logits_v = log q(z | x = v) + const.
    logits = -0.5 * (z.unsqueeze(-1) - a * values) ** 2 / s2
    logp = torch.log_softmax(logits, dim=-1)
    return -sum_dims(logp.gather(-1, value_index.unsqueeze(-1)).squeeze(-1))


def prior_nats(x0: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) in closed form, per sample (Luo eq. 58's prior matching)."""
    a2, s2, log_s2 = alpha_sq(gamma_1), sigma_sq(gamma_1), log_sigma_sq(gamma_1)
    return sum_dims(0.5 * (s2 + a2 * x0**2 - 1 - log_s2))


def prior_consistency_nats(x0: torch.Tensor, gamma_prev: torch.Tensor, gamma_T: torch.Tensor) -> torch.Tensor:
    """E_{q(x_{T-1}|x_0)} KL(q(x_T | x_{T-1}) || N(0, I)) in closed form (Luo eq. 45's prior term)."""
    a2_step = alpha_sq(gamma_T) / alpha_sq(gamma_prev)  # alpha_T of Luo
    v_step = -torch.expm1(gamma_prev - gamma_T) * sigma_sq(gamma_T)  # 1 - alpha_T
    ex2 = alpha_sq(gamma_prev) * x0**2 + sigma_sq(gamma_prev)  # E[x_{T-1}^2]
    return sum_dims(0.5 * (v_step + a2_step * ex2 - 1 - torch.log(v_step)))


# ---------------------------------------------------------------------------------------
# The diffusion term, one term per sample, unbiased for the sum (or integral) under uniform u


def diffusion_continuous_nats(
    x0: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor, dgamma: torch.Tensor, eps_model: EpsModel
) -> torch.Tensor:
    """Kingma et al. eq. 17: L_inf = 0.5 E_{tau ~ U(0,1)} gamma'(tau) ||eps - eps_hat(z_tau, gamma)||^2."""
    eps_hat = eps_model(noisy_latent(x0, gamma, eps), gamma)
    return 0.5 * dgamma * sum_dims((eps - eps_hat) ** 2)


def diffusion_denoising_nats(
    x0: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, num_terms: int, schedule: nn.Module, eps_model: EpsModel
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Term t = k + 2 in 2..T of Luo eq. 58, scaled by the number of terms K = T - 1.

    KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) = 0.5 expm1(gamma_t - gamma_{t-1}) ||eps - eps_hat||^2
    (Kingma et al. eq. 13). Returns (loss [B], tau [B] and gamma [B] of x_t, the noisier latent).
    """
    K = num_terms
    tau_t, tau_s = (k + 1).float() / K, k.float() / K
    g_t, _ = schedule(tau_t)
    g_s, _ = schedule(tau_s)
    eps_hat = eps_model(noisy_latent(x0, g_t, eps), g_t)
    return K * 0.5 * torch.expm1(g_t - g_s) * sum_dims((eps - eps_hat) ** 2), tau_t, g_t


def diffusion_consistency_nats(
    x0: torch.Tensor,
    eps: torch.Tensor,
    eps_step: torch.Tensor,
    k: torch.Tensor,
    num_terms: int,
    schedule: nn.Module,
    eps_model: EpsModel,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Term t = k + 1 in 1..T-1 of the consistency form (Luo eq. 45, with the expectation over
    the joint chain; see the package docstring), scaled by K = T - 1: x_t at tau = k/K drawn with
    ``eps``, x_{t+1} at (k+1)/K drawn from q(x_{t+1} | x_t) with ``eps_step``.

    Returns (loss [B], tau [B] and gamma [B] of x_{t+1}, the noisier latent).
    """
    K = num_terms
    tau_t, tau_n = k.float() / K, (k + 1).float() / K
    g_t, _ = schedule(tau_t)
    g_n, _ = schedule(tau_n)
    g_p, _ = schedule((k - 1).clamp(min=0).float() / K)
    z_t = noisy_latent(x0, g_t, eps)
    # x_{t+1} ~ q(x_{t+1} | x_t) = N(sqrt(alpha_{t+1}) x_t, 1 - alpha_{t+1}).
    a2_step = alpha_sq(g_n) / alpha_sq(g_t)
    v_step = -torch.expm1(g_t - g_n) * sigma_sq(g_n)
    z_n = bcast(a2_step.sqrt(), x0) * z_t + bcast(v_step.sqrt(), x0) * eps_step
    mean, var = reverse_mean_var(z_n, g_n, g_t, eps_model(z_n, g_n))
    # Entropy of q(x_t | x_{t-1}): variance 1 - alpha_t (t >= 2) or sigma_1^2 (t = 1, x_0 = data).
    v_enc = torch.where(k == 0, sigma_sq(g_t), -torch.expm1(g_p - g_t) * sigma_sq(g_t))
    term = 0.5 * sum_dims((z_t - mean) ** 2 / var + torch.log(var / bcast(v_enc, x0)) - 1)
    return K * term, tau_n, g_n


# ---------------------------------------------------------------------------------------
# The learned time map of the continuous-time diffusion term (Kingma et al. App. I.2)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``holder["scale"]``.

    The scale is filled in after the forward pass (it is the per-sample loss), before
    backward runs. Used to turn the ELBO gradient reaching a learned time map into the
    gradient of the squared loss: d(L^2)/d eta = 2 L dL/d eta (Kingma et al. 2021, App. I.2).
    """

    @staticmethod
    def forward(ctx, x, holder):
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.holder["scale"], None


def learned_time_map(time_map: nn.Module, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """gamma, gamma' at u through a :class:`~pipeline.objectives.vdm.schedules.LearnedSchedule`,
    with the gradient into its interior (``time_map.net``) rerouted by :class:`_ScaleGrad`.

    Returns (gamma, gamma', holder); the caller sets ``holder["scale"]`` to 2 L (per sample)
    before backward, so the interior receives the gradient of E[L^2] instead of E[L].
    """
    holder: dict = {"scale": 1.0}
    f, df = time_map.net(u)
    f, df = _ScaleGrad.apply(f, holder), _ScaleGrad.apply(df, holder)
    g0, g1 = time_map.endpoints()
    return g0 + (g1 - g0) * f, (g1 - g0) * df, holder
