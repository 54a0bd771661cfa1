"""EMA and the sharding-aware helpers, one process (sharded paths run in tests/integration)."""

import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.deepspeed_engine import ds_config
from pipeline.train.ema import EMA, full_parameters, plain_copy


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def test_ema_follows_the_formula_and_copies_buffers():
    net = _net()
    ema = EMA(net, decay=0.9)
    e0 = {n: p.clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].running_mean.fill_(3.0)
    ema.update(net)
    d = min(0.9, 2 / 11)  # warm-up: (1 + n) / (10 + n) with n = 1
    for n, p in ema.module.named_parameters():
        theta = dict(net.named_parameters())[n]
        torch.testing.assert_close(p, d * e0[n] + (1 - d) * theta, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 3.0))


def test_plain_copy_drops_hooks_and_shares_no_storage():
    net = _net()
    calls = []
    net[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    copy = plain_copy(net)
    copy(torch.randn(2, 3))
    assert calls == []  # the original's hooks are not carried over
    assert all(not p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, net[0].weight)


def test_full_parameters_of_a_plain_module_are_its_parameters():
    net = _net()
    with full_parameters(net) as full:
        assert full.keys() == dict(net.named_parameters()).keys()
        assert all(torch.equal(full[n], p) for n, p in net.named_parameters())


def test_ds_config_maps_engine_and_train_settings():
    cfg = ds_config(
        EngineConfig(backend="deepspeed", zero_stage=3, offload_optimizer=True, mixed_precision="bf16"),
        TrainConfig(num_steps=10, grad_accum_steps=4, grad_clip_norm=None),
        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    z = cfg["zero_optimization"]
    assert (z["stage"], z["overlap_comm"], z["contiguous_gradients"]) == (3, False, False)
    assert z["offload_optimizer"]["device"] == "cpu" and z["stage3_param_persistence_threshold"] == 0
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
