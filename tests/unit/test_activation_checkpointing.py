"""Activation checkpointing of the UNet's residual blocks (vdm.activation_checkpointing): the
same function and the same gradients as without it, fewer tensors kept for backward."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models import UNet
from pipeline.objectives.vdm.config import VDMConfig


def _pair(ndim: int):
    torch.manual_seed(0)
    plain = UNet(2, channels=8, emb_dim=16, ndim=ndim)
    ckpt = UNet(2, channels=8, emb_dim=16, ndim=ndim, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    with torch.no_grad():  # the zero-initialised output conv would hide every other gradient
        for net in (plain, ckpt):
            net.out.weight.copy_(torch.linspace(-1, 1, net.out.weight.numel()).reshape(net.out.weight.shape))
    return plain, ckpt


def _grads(net, z, emb):
    net.zero_grad(set_to_none=True)
    z = z.clone().requires_grad_(True)
    out = net(z, emb)
    (out * torch.cos(out)).sum().backward()
    return out.detach(), z.grad, {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gradients_equal_without_checkpointing(ndim):
    plain, ckpt = _pair(ndim)
    z, emb = torch.randn(3, 2, *(8,) * ndim), torch.randn(3, 16)
    out_a, dz_a, g_a = _grads(plain, z, emb)
    out_b, dz_b, g_b = _grads(ckpt, z, emb)
    # Recomputation repeats the same kernels on the same inputs: bitwise equal on CPU.
    assert torch.equal(out_a, out_b) and torch.equal(dz_a, dz_b)
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        assert g_a[n] is not None and torch.equal(g_a[n], g_b[n]), n


def test_fewer_activations_saved_for_backward():
    plain, ckpt = _pair(2)
    z, emb = torch.randn(4, 2, 16, 16), torch.randn(4, 16)

    def saved_numel(net) -> int:
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            net(z, emb).sum()
        return sum(total)

    assert saved_numel(ckpt) < 0.6 * saved_numel(plain)


def test_no_checkpointing_without_grad():
    _, ckpt = _pair(2)
    with torch.no_grad():
        assert ckpt(torch.randn(1, 2, 8, 8), torch.randn(1, 16)).shape == (1, 2, 8, 8)


def test_mlp_refuses_the_flag():
    with pytest.raises(ConfigError, match="vdm.activation_checkpointing=true applies to the UNet"):
        VDMConfig(architecture="mlp", activation_checkpointing=True).validate()
