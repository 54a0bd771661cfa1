"""The engine's cast for bf16/fp16 weights (DeepSpeed's bf16/fp16 modes convert the parameters
themselves): float32 inputs are cast where they meet a module's own weights, integer inputs
pass, spectral-normed layers (whose weight lives in a parametrization) are included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.train.engines.half_weights import cast_inputs_to_weights


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 4)
        self.lin = spectral_norm(nn.Linear(4, 4))
        self.out = nn.Linear(4, 1)

    def forward(self, x, labels):
        return self.out(torch.relu(self.lin(x) + self.emb(labels)))


def test_float_inputs_meet_bf16_weights_in_bf16_and_integer_labels_pass():
    torch.manual_seed(0)
    net = Net()
    x, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    reference = net(x, labels).detach()
    net.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):  # what DeepSpeed bf16 weights do without the cast
        net(x, labels)
    handles = cast_inputs_to_weights(net)
    assert len(handles) == 3  # emb, lin (through its parametrization), out; not the container
    seen = {}
    net.lin.register_forward_pre_hook(lambda m, args: seen.update(lin_input=args[0].dtype))
    y = net(x, labels)
    assert y.dtype == torch.bfloat16 and seen["lin_input"] == torch.bfloat16
    # bf16 rounding (2^-9 relative per op) over three layers: close to the float32 result, not equal
    torch.testing.assert_close(y.float(), reference, rtol=5e-2, atol=5e-2)
    assert not torch.equal(y.float(), reference)


def test_float32_weights_are_left_alone():
    net = nn.Linear(3, 2)
    cast_inputs_to_weights(net)
    x = torch.randn(4, 3)
    assert torch.equal(net(x), torch.nn.functional.linear(x, net.weight, net.bias))
    assert net(x.double().float()).dtype == torch.float32
