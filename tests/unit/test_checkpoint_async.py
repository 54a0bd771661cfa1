"""Asynchronous checkpoints (train.async_checkpoint), 1 process: staged at the save, counted only
once committed; ``latest`` and retention never see one in flight; a failed write never counts."""

import time

import pytest
import torch

from pipeline.train.checkpoint import LATEST, CheckpointError, Checkpointer, validate
from pipeline.train.state import TrainState
from tests.unit.test_checkpoint import Counter, _setup, _train_one, engine  # noqa: F401 (fixture)

DELAY = "PIPELINE_CHECKPOINT_WRITE_DELAY_S"


def _latest(ck) -> str:
    return (ck.root / LATEST).read_text().strip()


def test_what_is_saved_is_the_state_at_the_save_not_at_the_commit(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path)
    _train_one(phase)
    state, counter = TrainState(step=4, samples_seen=32), Counter()
    counter.value = 11
    ck.save_async(4, [phase], {"trainer": state}, {"stream": counter})
    w = phase.module.lin.weight.detach().clone()
    m = phase.torch_optimizer.state[phase.module.lin.weight]["exp_avg"].clone()
    # Training goes on before the commit: weights, Adam moments and counters all move.
    _train_one(phase)
    state.step, counter.value = 5, 12
    assert not torch.equal(phase.module.lin.weight, w)
    path = ck.finalize()
    assert path == ck.root / "step-00000004" and validate(path)["step"] == 4 and _latest(ck) == path.name

    phase2, ck2 = _setup(engine, tmp_path)
    state2, counter2 = TrainState(), Counter()
    ck2.restore([phase2], {"trainer": state2}, {"stream": counter2})
    assert torch.equal(phase2.module.lin.weight, w)
    assert torch.equal(phase2.torch_optimizer.state[phase2.module.lin.weight]["exp_avg"], m)
    assert (state2.step, state2.samples_seen, counter2.value) == (4, 32, 11)


def test_in_flight_checkpoint_is_not_latest_and_retention_does_not_see_it(engine, tmp_path, monkeypatch):
    phase, ck = _setup(engine, tmp_path, keep_last=1)
    ck.save(1, [phase], {"trainer": TrainState(step=1)}, {})
    monkeypatch.setenv(DELAY, "1.5")
    t0 = time.monotonic()
    ck.save_async(2, [phase], {"trainer": TrainState(step=2)}, {})
    assert time.monotonic() - t0 < 1.0  # staged and returned: the write waits in the background
    monkeypatch.delenv(DELAY)
    assert ck.poll() is None  # not done yet: nothing committed
    assert _latest(ck) == "step-00000001"
    assert ck.find_latest_valid()[1]["step"] == 1
    assert sorted(p.name for p in ck.root.iterdir()) == [".partial-step-00000002", LATEST, "step-00000001"]
    deadline = time.monotonic() + 30
    while (path := ck.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert path.name == "step-00000002" and _latest(ck) == "step-00000002"
    # Retention (keep_last=1) ran at the commit, once the new one counted.
    assert sorted(p.name for p in ck.root.iterdir()) == [LATEST, "step-00000002"]
    assert ck.poll() is None and ck.finalize() is None  # nothing in flight any more


def test_a_sync_save_or_another_async_save_commits_the_one_in_flight_first(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path)
    ck.save_async(1, [phase], {"trainer": TrainState(step=1)}, {})
    _train_one(phase)
    ck.save_async(2, [phase], {"trainer": TrainState(step=2)}, {})
    assert validate(ck.root / "step-00000001")["step"] == 1
    ck.save(3, [phase], {"trainer": TrainState(step=3)}, {})
    assert [validate(ck.root / f"step-0000000{s}")["step"] for s in (1, 2, 3)] == [1, 2, 3]
    assert _latest(ck) == "step-00000003"


class Unpicklable:
    """Shared state whose write fails in the background (a lambda cannot be pickled)."""

    def state_dict(self):
        return {"f": lambda: 0}

    def load_state_dict(self, s):
        pass


def test_a_failed_background_write_never_counts(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path)
    ck.save(1, [phase], {"trainer": TrainState(step=1)}, {})
    ck.save_async(2, [phase], {"bad": Unpicklable()}, {})
    with pytest.raises(CheckpointError, match="step 2 failed"):
        ck.finalize()
    assert _latest(ck) == "step-00000001"
    assert not (ck.root / "step-00000002").exists() and not list(ck.root.glob(".partial-*"))


def test_abandoned_checkpoint_is_removed_at_the_next_start(engine, tmp_path, capsys):
    phase, ck = _setup(engine, tmp_path)
    ck.save(1, [phase], {"trainer": TrainState(step=1)}, {})
    ck.save_async(2, [phase], {"trainer": TrainState(step=2)}, {})
    ck.abandon()  # the run stopped with an error
    assert "step 2 was still being written and does not count" in capsys.readouterr().err
    assert ck.finalize() is None and _latest(ck) == "step-00000001"
    time.sleep(0.5)  # its background write ends on its own
    phase2, ck2 = _setup(engine, tmp_path)
    assert not list(ck2.root.glob(".partial-*"))
    st = TrainState()
    assert ck2.restore([phase2], {"trainer": st}, {})["step"] == 1 and st.step == 1
