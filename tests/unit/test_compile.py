"""engine.compile: the networks inside a phase are compiled in place (names and state dicts
unchanged), the EMA's plain copy runs its own weights eagerly, ZeRO-3 is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.config import ConfigError, EngineConfig, TrainConfig, load_config
from pipeline.models import MLP
from pipeline.train.compile import compile_networks
from pipeline.train.engines import build_engine
from pipeline.train.phases import Phase


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MLP(4, 8, 2, 4)
        self.head = nn.Linear(4, 1)


def test_compiles_the_networks_in_place_keeping_state_dict():
    torch.manual_seed(0)
    w = Wrapper()
    keys = list(w.state_dict())
    x, emb = torch.randn(3, 4), torch.randn(3, 4)
    eager = w.net(x, emb)
    assert compile_networks(w) == ["net"]
    assert list(w.state_dict()) == keys and w.net._compiled_call_impl is not None
    torch.testing.assert_close(w.net(x, emb), eager, rtol=1e-5, atol=1e-6)  # compiled forward, same function


def test_plain_copy_of_a_compiled_module_uses_its_own_weights():
    engine = build_engine(EngineConfig())
    w = Wrapper()
    compile_networks(w)
    copy = engine.prepare(Phase("m", w, lr=1e-2), TrainConfig(num_steps=1)).plain_copy()
    assert all(m._compiled_call_impl is None for m in copy.modules())
    with torch.no_grad():
        for p in copy.net.parameters():
            p.zero_()
    x = torch.randn(2, 4)
    assert torch.count_nonzero(copy.net(x, x)) == 0  # not the original's compiled forward


def test_zero3_refuses_compile():
    base = ["run.dir=r", "data.train_urls=d", "train.num_steps=1", "engine.backend=deepspeed", "engine.compile=true"]
    with pytest.raises(ConfigError, match="engine.compile=true cannot be used with ZeRO-3"):
        load_config(None, [*base, "engine.zero_stage=3"])
    assert load_config(None, [*base, "engine.zero_stage=2"]).engine.compile
