"""Small pieces of the training stack: LR schedule, EMA, RNG state, labels for sampling."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.data.meta import DataMeta
from pipeline.train.ema import EMA
from pipeline.train.engines import build_engine
from pipeline.train.phases import Phase
from pipeline.train.sampling import default_labels, grid_labels
from pipeline.train.schedule import lr_lambda
from pipeline.train.state import RNGState


def test_lr_warmup_then_cosine_to_floor():
    f = lr_lambda(TrainConfig(num_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    # Half-way through the decay the cosine is at its midpoint between 1 and the floor.
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_lr_constant_without_decay():
    f = lr_lambda(TrainConfig(num_steps=10))
    assert {f(s) for s in range(20)} == {1.0}


def test_lr_schedule_counts_loop_steps_for_a_phase_that_repeats():
    """A GAN's D steps n_critic times per loop step; its warm-up and decay run over the
    loop's steps like G's, not n_critic times faster (before 2026-12-07 D's lr reached its
    floor after num_steps / n_critic loop steps)."""
    train = TrainConfig(num_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    per_loop_step, d = lr_lambda(train), lr_lambda(train, repeats=5)
    assert [d(5 * s + j) for s in (0, 3, 60, 110) for j in range(5)] == \
        [per_loop_step(s) for s in (0, 3, 60, 110) for _ in range(5)]
    engine = build_engine(EngineConfig())
    ph = engine.prepare(Phase("d", nn.Linear(2, 1), lr=1e-2, repeats=5), train)
    for _ in range(5 * 60):
        ph.scheduler.step()
    assert ph.torch_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * per_loop_step(60), rel=1e-12)


def test_ema_matches_hand_computed_average():
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    engine = build_engine(EngineConfig())
    prepare = lambda m: engine.prepare(Phase("m", m, lr=1e-2), TrainConfig(num_steps=10))  # noqa: E731
    ph = prepare(net)
    ema = EMA(ph, decay=0.9)
    w0 = net.weight.detach().clone()
    expected = w0.clone()
    for n in range(1, 6):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update(ph)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * net.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert not ema.module.weight.requires_grad
    clone = EMA(prepare(nn.Linear(2, 1)), decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert clone.num_updates == 5 and torch.equal(clone.module.weight, ema.module.weight)


def test_rng_state_round_trip_all_generators():
    s = RNGState()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = s.state_dict()
    a = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    s.load_state_dict(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == a


def test_default_labels():
    cls = DataMeta((1, 8, 8), "levels", 17, "class", 10)
    assert default_labels(cls, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="allowed: 0..9"):
        default_labels(cls, 3, [12])
    temp = DataMeta((1, 8, 8), "spins", label_kind="continuous", label_values=(2.0, 3.0))
    assert default_labels(temp, 3).tolist() == [2.0, 3.0, 2.0]
    assert default_labels(DataMeta((2,), "continuous"), 4) is None
    with pytest.raises(ValueError, match="unconditional"):
        default_labels(DataMeta((2,), "continuous"), 4, [1.0])


def test_contract_hooks_run_per_micro_step_and_per_optimizer_step():
    """With train.grad_accum_steps=2, the loop calls after_micro_step once per micro batch (with
    that micro batch's output) and after_optimizer_step once per optimizer step."""
    from dataclasses import dataclass

    from pipeline.objectives.base import Objective
    from pipeline.train.loop import optimizer_step
    from pipeline.train.state import TrainState

    @dataclass
    class Out:
        loss: torch.Tensor

        def metrics(self) -> dict[str, float]:
            return {"loss": float(self.loss)}

    class Counting(Objective):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))
            self.calls: list[tuple] = []

        def forward(self, batch, ctx=None):
            return Out((self.w * batch["x"]).sum())

        def after_micro_step(self, output, all_gather):
            self.calls.append(("micro", float(output.loss.detach())))

        def after_optimizer_step(self, all_gather):
            self.calls.append(("optimizer",))

    train = TrainConfig(num_steps=3, grad_accum_steps=2)
    engine = build_engine(EngineConfig())
    obj = Counting()
    ph = engine.prepare(Phase("c", obj, lr=0.0), train)
    batches = iter([{"x": torch.full((2,), float(i))} for i in range(6)])
    state = TrainState()
    for _ in range(3):
        optimizer_step(ph, batches, state, engine, train, seed=0)
    assert obj.calls == [("micro", 0.0), ("micro", 2.0), ("optimizer",),
                         ("micro", 4.0), ("micro", 6.0), ("optimizer",),
                         ("micro", 8.0), ("micro", 10.0), ("optimizer",)]


def test_grid_labels_spread_over_a_continuous_label_known_only_by_its_range():
    energies = DataMeta(sample_shape=(4,), data_kind="continuous", label_kind="continuous", label_range=(1.0, 1000.0))
    assert torch.allclose(grid_labels(energies, 4), torch.tensor([1.0, 10.0, 100.0, 1000.0]))  # log-uniform data
    narrow = DataMeta(sample_shape=(4,), data_kind="continuous", label_kind="continuous", label_range=(2.0, 3.0))
    assert torch.allclose(grid_labels(narrow, 3), torch.tensor([2.0, 2.5, 3.0]))
    temps = DataMeta(sample_shape=(4,), data_kind="continuous", label_kind="continuous", label_values=(2.0, 3.0))
    assert grid_labels(temps, 3).tolist() == [2.0, 3.0, 2.0]  # the data's own values, as default_labels
    with pytest.raises(ValueError, match="give --label"):  # the CLI still asks for one
        default_labels(energies, 4)
