"""EMA and the engine's full-weight views, one process (sharded paths run in tests/integration)."""

import pytest
import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.ema import EMA
from pipeline.train.engines import build_engine
from pipeline.train.engines.deepspeed import ds_config
from pipeline.train.phases import Phase


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineConfig())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def _prepared(engine, net, train=TrainConfig(num_steps=10)):
    return engine.prepare(Phase("m", net, lr=1e-2), train)


def test_ema_follows_the_formula_and_copies_buffers(engine):
    net = _net()
    ph = _prepared(engine, net)
    ema = EMA(ph, decay=0.9)
    e0 = {n: p.clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].running_mean.fill_(3.0)
    ema.update(ph)
    d = min(0.9, 2 / 11)  # warm-up: (1 + n) / (10 + n) with n = 1
    for n, p in ema.module.named_parameters():
        theta = dict(net.named_parameters())[n]
        torch.testing.assert_close(p, d * e0[n] + (1 - d) * theta, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 3.0))


def test_ema_of_half_weights_averages_in_float32(engine):
    """DeepSpeed's bf16 mode stores the module's weights in bf16; an EMA kept in bf16 would
    not move at all at decay 0.999 (each increment is far below a bf16 ulp of the weight)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(torch.bfloat16)
    ph = _prepared(engine, net)
    ema = EMA(ph, decay=0.999)
    ema.num_updates = 10_000  # past the warm-up: the decay is 0.999
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    w0 = {n: p.double() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(2.0 ** -4)  # a step representable in bf16 for |w| < 1
    w1 = {n: p.double() for n, p in net.named_parameters()}
    for _ in range(100):
        ema.update(ph)
    for n, p in ema.module.named_parameters():
        expected = w1[n] + (w0[n] - w1[n]) * 0.999 ** 100
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=2e-5)
    assert ema.module(torch.randn(2, 3)).dtype == torch.float32  # samples in float32


def test_plain_copy_drops_hooks_and_shares_no_storage(engine):
    net = _net()
    calls = []
    net[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    copy = _prepared(engine, net).plain_copy()
    copy(torch.randn(2, 3))
    assert calls == []  # the original's hooks are not carried over
    assert all(not p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, net[0].weight)


def test_full_state_of_a_plain_module_is_its_parameters_and_buffers(engine):
    net = _net()
    with _prepared(engine, net).full_state() as full:
        own = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        assert full.keys() == own.keys()
        assert all(torch.equal(full[n], t) and not full[n].requires_grad for n, t in own.items())


def test_step_clips_to_the_norm_given_at_prepare(engine):
    """``step`` takes no norm: the phase clips to ``train.grad_clip_norm`` of its TrainConfig."""
    norms = []
    for max_norm in (1e-3, None):
        torch.manual_seed(0)
        ph = _prepared(engine, nn.Linear(3, 1), TrainConfig(num_steps=10, grad_clip_norm=max_norm))
        ph.optimizer.optimizer.register_step_pre_hook(  # the gradients Adam is handed
            lambda opt, args, kwargs: norms.append(float(torch.cat([p.grad.flatten() for p in opt.param_groups[0]["params"]]).norm())))
        ph.backward(ph.module(torch.randn(8, 3)).pow(2).mean() * 100)
        reported, skipped = ph.step(local_ok=True)
        assert not skipped and reported > 1e-2  # the norm before clipping
    assert norms[0] == pytest.approx(1e-3, rel=1e-3) and norms[1] == pytest.approx(reported, rel=1e-6)


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
