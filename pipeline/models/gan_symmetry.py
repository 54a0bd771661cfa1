"""Z2 (x -> -x) symmetry for GANs on data that has it (Ising spins at zero field, phi^4):
a generator whose samples are exactly symmetric, and a critic that is exactly invariant."""

from __future__ import annotations

import torch
import torch.nn as nn


class SignSymmetricGenerator(nn.Module):
    """G'(h) = s G(h with h_0 -> |h_0|), s = the sign of the latent's first entry h_0: an output
    distribution exactly symmetric under x -> -x (for a latent prior symmetric in h_0), for data
    with that Z2 symmetry (Ising spins at zero field, phi^4). G itself may then draw one sign's
    configurations only. Why: in a broken phase the data has two separated modes (phi^4 at kappa
    0.35: M near +3.2 or -3.2, never near 0); a continuous map from a connected latent space onto
    both must pass between them, and a plain G drew 1 % of its fields with |M| < 0.25
    (docs/model_zoo.md). The flip is the discontinuity G cannot make itself (Z2-equivariant
    models of lattice fields: Albergo, Kanwar, Shanahan 2019, sec. IV)."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g
        self.latent_dim = g.latent_dim

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sign = torch.where(h[:, :1] < 0, -1.0, 1.0).to(h.dtype)
        y = self.g(torch.cat([h[:, :1].abs(), h[:, 1:]], dim=1), labels)
        return y * sign.reshape((-1,) + (1,) * (y.dim() - 1))


class SignSymmetricDiscriminator(nn.Module):
    """D'(x) = (D(x) + D(-x)) / 2: a critic exactly invariant under x -> -x, to go with
    :class:`SignSymmetricGenerator` (alone it could not tell a G that draws one sign only).
    When G and the data share the symmetry, the best critic has it too; this one need not learn
    each of a broken phase's two modes separately. One forward of D on [x, -x] (the objectives
    keep to one forward per backward; a minibatch std's groups stay inside each half)."""

    def __init__(self, d: nn.Module):
        super().__init__()
        self.d = d

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.d(torch.cat([x, -x]), None if labels is None else torch.cat([labels, labels]))
        return 0.5 * (out[: x.shape[0]] + out[x.shape[0]:])


def with_sign_symmetry(g: nn.Module, d: nn.Module, g_sign_symmetric: bool,
                       d_sign_symmetric: bool) -> tuple[nn.Module, nn.Module]:
    """(G, D), each wrapped when asked; a symmetric D needs the symmetric G."""
    if d_sign_symmetric and not g_sign_symmetric:
        raise ValueError("a sign-symmetric D cannot tell a G that draws one sign only: it needs g_sign_symmetric")
    return (SignSymmetricGenerator(g) if g_sign_symmetric else g), (SignSymmetricDiscriminator(d) if d_sign_symmetric
                                                                    else d)
