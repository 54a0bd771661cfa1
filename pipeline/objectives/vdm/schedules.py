"""Noise schedules of a variance-preserving diffusion, written as gamma(t) = -log SNR(t).

Kingma et al. 2021 ("Variational Diffusion Models", sec. 3.1-3.2): the forward process is
q(z_t | x) = N(alpha_t x, sigma_t^2 I) with alpha_t^2 = sigmoid(-gamma(t)) and
sigma_t^2 = sigmoid(gamma(t)), gamma increasing on t in [0, 1]. Every schedule here is an
``nn.Module`` that maps t (any shape) to ``(gamma(t), dgamma/dt(t))``; the derivative is
what the continuous-time loss needs (Kingma et al. eq. 17) and is computed analytically.

Time t = 0 is the least noisy latent (the first latent x_1 in Luo 2022's indexing), t = 1
the most noisy (x_T).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t  (Kingma et al. 2021, fixed linear)."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        _check_endpoints(gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.gamma_max - self.gamma_min
        return self.gamma_min + span * t, torch.full_like(t, span)


class CosineSchedule(nn.Module):
    """The cosine schedule (Nichol & Dhariwal 2021) with its log-SNR clipped to the endpoints.

    alpha^2 = cos^2(pi u / 2) gives gamma(u) = 2 log tan(pi u / 2). Mapping t in [0, 1]
    linearly onto the u interval whose gamma range is [gamma_min, gamma_max] keeps the
    endpoints identical to the linear schedule's, so in continuous time both define the
    same ELBO (Kingma et al. 2021 eq. 17: the loss depends on the schedule only through
    its endpoints).
    """

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        _check_endpoints(gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.u_min = 2 / math.pi * math.atan(math.exp(gamma_min / 2))
        self.u_max = 2 / math.pi * math.atan(math.exp(gamma_max / 2))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        du = self.u_max - self.u_min
        u = self.u_min + du * t
        a = math.pi * u / 2
        gamma = 2 * torch.log(torch.tan(a))
        # d/du 2 log tan(pi u/2) = pi / (sin(a) cos(a)) = 2 pi / sin(2a)
        dgamma = du * 2 * math.pi / torch.sin(2 * a)
        return gamma, dgamma


class MonotoneNet(nn.Module):
    """Kingma et al. 2021 Appendix H's monotone network, normalised to map [0,1] onto [0,1].

    g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) with positive weights (softplus of free
    parameters), hence strictly increasing; f(t) = (g(t) - g(0)) / (g(1) - g(0)).
    Returns (f(t), f'(t)); f'(t) > 0 for all t by construction.
    """

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(()))
        self.b1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.w3 = nn.Parameter(torch.full((hidden,), -3.0))

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The floor keeps g strictly increasing (g' >= w1 > 0) even if softplus underflows.
        w1, w2, w3 = F.softplus(self.w1) + 1e-4, F.softplus(self.w2), F.softplus(self.w3)
        h = w1 * t + self.b1
        a = h.unsqueeze(-1) * w2 + self.b2
        s = torch.sigmoid(a)
        g = h + (s * w3).sum(-1)
        dg = w1 + (s * (1 - s) * w2 * w3).sum(-1) * w1
        return g, dg

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, dg = self._g(t)
        ends, _ = self._g(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        scale = ends[1] - ends[0]
        return (g - ends[0]) / scale, dg / scale


class LearnedSchedule(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) f(t) with f a :class:`MonotoneNet`.

    Monotone by construction. Endpoints are buffers (fixed) or parameters (learned, with
    gamma_1 - gamma_0 = softplus(.) + 0.01 > 0 so monotonicity survives any optimizer step).
    ``net`` (the interior, f) and ``endpoints()`` are public so that the VDM can route the
    variance-minimising gradient of Kingma et al. Appendix I.2 into the interior only.
    """

    def __init__(self, gamma_min: float, gamma_max: float, learn_endpoints: bool = False, hidden: int = 64):
        super().__init__()
        _check_endpoints(gamma_min, gamma_max)
        self.net = MonotoneNet(hidden)
        g0 = torch.tensor(float(gamma_min))
        gap_raw = torch.tensor(_softplus_inv(gamma_max - gamma_min - _MIN_GAP))
        if learn_endpoints:
            self.gamma_0 = nn.Parameter(g0)
            self.gap_raw = nn.Parameter(gap_raw)
        else:
            self.register_buffer("gamma_0", g0)
            self.register_buffer("gap_raw", gap_raw)

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        g0 = self.gamma_0
        return g0, g0 + F.softplus(self.gap_raw) + _MIN_GAP

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, df = self.net(t)
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * f, (g1 - g0) * df


_MIN_GAP = 0.01  # smallest gamma_1 - gamma_0 of a learned schedule


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _check_endpoints(gamma_min: float, gamma_max: float) -> None:
    if not gamma_min + _MIN_GAP < gamma_max:
        raise ValueError(f"schedule needs gamma_min < gamma_max - {_MIN_GAP}, got gamma_min={gamma_min}, gamma_max={gamma_max}")


SCHEDULES = ("linear", "cosine", "learned")


def build_schedule(name: str, gamma_min: float, gamma_max: float, learn_endpoints: bool = False) -> nn.Module:
    if name == "linear":
        sched = LinearSchedule(gamma_min, gamma_max)
    elif name == "cosine":
        sched = CosineSchedule(gamma_min, gamma_max)
    elif name == "learned":
        return LearnedSchedule(gamma_min, gamma_max, learn_endpoints=learn_endpoints)
    else:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if learn_endpoints:
        raise ValueError(f"learn_endpoints=True needs schedule 'learned', got {name!r}")
    return sched
