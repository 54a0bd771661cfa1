"""Model-state memory counted from a rank's tensors (pipeline/train/engines/memory.py): each
storage once however many views share it, local shards only, against numel x element size."""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.engines import build_engine
from pipeline.train.engines.memory import StateCounter, tensors_in
from pipeline.train.phases import Phase


def test_views_of_one_storage_count_once_and_categories_do_not_double_count():
    flat = torch.zeros(100)
    c = StateCounter()
    c.add("params", [flat[:40], flat[40:]])
    c.add("grads", [flat, torch.zeros(10, dtype=torch.bfloat16), None])
    assert c.bytes == {"params": 400, "grads": 20, "optimizer": 0}


def test_tensors_in_nested_containers():
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    assert [t.numel() for t in tensors_in({"x": [a, (b,)], "y": c, "z": 3})] == [1, 2, 3]


def test_one_process_adam_state_is_params_grads_and_two_moments():
    net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 1))
    numel = sum(p.numel() for p in net.parameters())
    ph = build_engine(EngineConfig()).prepare(Phase("m", net, lr=1e-2), TrainConfig(num_steps=2))
    for _ in range(2):
        ph.backward(net(torch.randn(4, 5)).sum())
        state = ph.model_state_bytes()
        ph.step(True)
    # after the first step Adam holds exp_avg and exp_avg_sq per parameter (its 0-dim step
    # counters are not model state)
    assert state == {"params": 4 * numel, "grads": 4 * numel, "optimizer": 8 * numel}
