"""Checkpoint module: round trip, atomicity, corrupt-latest fallback, retention (1 process)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.config import TrainConfig
from pipeline.train.checkpoint import LATEST, CheckpointError, Checkpointer, validate
from pipeline.config import EngineConfig
from pipeline.train.engines import build_engine
from pipeline.train.phases import Phase
from pipeline.train.state import RNGState, TrainState


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch, ctx):
        return self.lin(batch["x"]).pow(2).mean()


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, s):
        self.value = s["value"]


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineConfig())


def _setup(engine, tmp_path, keep_last=3, keep_every=None):
    torch.manual_seed(0)
    phase = engine.prepare(Phase("vdm", Net(), lr=1e-2), TrainConfig(num_steps=100, grad_clip_norm=1.0))
    ck = Checkpointer(tmp_path / "ckpt", engine, keep_last=keep_last, keep_every=keep_every, config_hash="abc")
    return phase, ck


def _train_one(phase):
    loss = phase.forward({"x": torch.randn(8, 4)}, None)
    phase.backward(loss)
    phase.step(local_ok=True)


def test_round_trip_restores_model_optimizer_and_state(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path)
    state, counter = TrainState(step=5, samples_seen=40), Counter()
    counter.value = 17
    for _ in range(3):
        _train_one(phase)
    ck.save(5, [phase], {"trainer": state}, {"stream": counter, "rng": RNGState()})
    expected_w = phase.module.lin.weight.detach().clone()
    expected_next = torch.rand(3)  # the RNG stream right after the save
    expected_opt = phase.optimizer.state_dict()["state"][0]["exp_avg"].clone()

    phase2, ck2 = _setup(engine, tmp_path)
    state2, counter2 = TrainState(), Counter()
    assert not torch.equal(phase2.module.lin.weight, expected_w)
    manifest = ck2.restore([phase2], {"trainer": state2}, {"stream": counter2, "rng": RNGState()})
    assert manifest["step"] == 5
    assert torch.equal(phase2.module.lin.weight, expected_w)
    assert torch.equal(phase2.optimizer.state_dict()["state"][0]["exp_avg"], expected_opt)
    assert (state2.step, state2.samples_seen, counter2.value) == (5, 40, 17)
    assert torch.equal(torch.rand(3), expected_next)


def test_nothing_to_restore(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path)
    assert ck.restore([phase], {}, {}) is None


def test_crash_mid_write_leaves_previous_checkpoint_latest(engine, tmp_path, monkeypatch):
    phase, ck = _setup(engine, tmp_path)
    ck.save(1, [phase], {"trainer": TrainState(step=1)}, {})

    real_rename = os.rename

    def boom(src, dst, *a, **k):  # the rename of the checkpoint directory (DCP renames files too)
        if Path(dst).name == "step-00000002":
            raise OSError("disk full")
        real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        ck.save(2, [phase], {"trainer": TrainState(step=2)}, {})
    monkeypatch.undo()
    assert (ck.root / LATEST).read_text().strip() == "step-00000001"
    assert not (ck.root / "step-00000002").exists()
    # A new Checkpointer (the restarted run) cleans the partial directory and restores step 1.
    phase2, ck2 = _setup(engine, tmp_path)
    assert not list(ck2.root.glob(".partial-*"))
    st = TrainState()
    assert ck2.restore([phase2], {"trainer": st}, {})["step"] == 1 and st.step == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest"])
def test_corrupt_latest_falls_back_to_previous(engine, tmp_path, damage, capsys):
    phase, ck = _setup(engine, tmp_path)
    ck.save(1, [phase], {"trainer": TrainState(step=1)}, {})
    _train_one(phase)
    ck.save(2, [phase], {"trainer": TrainState(step=2)}, {})
    target = ck.root / "step-00000002" / "ddp-vdm" / "__0_0.distcp"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(target.read_bytes())
        b[len(b) // 2] ^= 0xFF
        target.write_bytes(bytes(b))
    else:
        (ck.root / "step-00000002" / "manifest.json").unlink()
    with pytest.raises(CheckpointError):
        validate(ck.root / "step-00000002")
    st = TrainState()
    assert ck.restore([phase], {"trainer": st}, {})["step"] == 1
    assert st.step == 1
    assert "skipping step-00000002" in capsys.readouterr().err


def test_retention_keeps_newest_k_and_every_mth(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 11):
        ck.save(step, [phase], {"trainer": TrainState(step=step)}, {})
    kept = sorted(json.loads((d / "manifest.json").read_text())["step"] for d in ck.root.iterdir() if d.is_dir())
    assert kept == [4, 8, 9, 10]


def test_latest_pointer_not_file_names_decides(engine, tmp_path):
    """The step comes from the manifest: a renamed directory still restores its own step."""
    phase, ck = _setup(engine, tmp_path)
    ck.save(3, [phase], {"trainer": TrainState(step=3)}, {})
    os.rename(ck.root / "step-00000003", ck.root / "renamed")
    (ck.root / LATEST).unlink()
    st = TrainState()
    assert ck.restore([phase], {"trainer": st}, {})["step"] == 3 and st.step == 3


def test_a_ddp_checkpoint_in_the_torch_save_format_still_loads(engine, tmp_path):
    """Before DCP, rank 0 wrote DDP phases with torch.save (model-<phase>.pt, optim-<phase>.pt)."""
    phase, _ = _setup(engine, tmp_path)
    for _ in range(2):
        _train_one(phase)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(phase.module.state_dict(), old / "model-vdm.pt")  # as accelerate.py wrote it until then
    torch.save({"optimizer": phase.optimizer.state_dict(), "scheduler": phase.scheduler.state_dict()},
               old / "optim-vdm.pt")
    phase2, _ = _setup(engine, tmp_path)
    assert not torch.equal(phase2.module.lin.weight, phase.module.lin.weight)
    phase2.load(old, 0)
    assert torch.equal(phase2.module.lin.weight, phase.module.lin.weight)
    m1, m2 = (p.optimizer.state_dict()["state"][0]["exp_avg"] for p in (phase, phase2))
    assert torch.equal(m1, m2)
    assert phase2.scheduler.state_dict() == phase.scheduler.state_dict()
