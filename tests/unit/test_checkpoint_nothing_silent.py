"""Issue 15 "Nothing silent": a world-size change never skips per-rank state without a warning
saying what was lost; all-corrupt checkpoints stop the resume and are never deleted; the
manifest records the data position (1 process; the world size of a saved checkpoint is
rewritten in its manifest, which the checksums do not cover)."""

import json

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import (
    MANIFEST, CheckpointError, _sha256, NoValidCheckpointError, ResumeWarning, Checkpointer,
)
from pipeline.train.state import RNGState, TrainState, reseed, seed_everything
from pipeline.data.stream import build_stream
from tests.unit.test_checkpoint import Counter, _setup, _train_one, engine  # noqa: F401 (fixture)
from tests.unit.test_data_stream import NUM_PER_T, cfg_for, indices, ising_dir, take  # noqa: F401


def _pretend_saved_on(directory, world_size: int) -> None:
    """Rewrite a checkpoint as if ``world_size`` ranks had saved it (rank 0's files kept)."""
    m = json.loads((directory / MANIFEST).read_text())
    m["world_size"] = world_size
    stream = directory / "stream-rank00000.pt"
    if stream.is_file():
        state = torch.load(stream, weights_only=True)
        state["world_size"] = world_size
        state["global_samples_consumed"] = state["samples_consumed"] * world_size
        torch.save(state, stream)
        m["files"][stream.name] = {"size": stream.stat().st_size, "sha256": _sha256(stream)}
    (directory / MANIFEST).write_text(json.dumps(m))


def _seeded(engine, tmp_path):
    phase, _ = _setup(engine, tmp_path)
    return phase, Checkpointer(tmp_path / "ckpt", engine, keep_last=3, keep_every=None, config_hash="abc", seed=7)


def test_other_world_size_warns_what_was_lost_and_reseeds_from_step(engine, tmp_path, ising_dir):
    phase, ck = _seeded(engine, tmp_path)
    stream = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    take(stream, 3)  # 24 samples into epoch 0
    rng = RNGState()
    path = ck.save(6, [phase], {"trainer": TrainState(step=6)}, {"stream": stream, "rng": rng},
                   data=stream.position_record())
    _pretend_saved_on(path, 2)  # as if 2 ranks had each consumed 24
    stream2 = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    torch.manual_seed(123)
    with pytest.warns(ResumeWarning) as rec:
        ck.restore([phase], {"trainer": TrainState()}, {"stream": stream2, "rng": RNGState()})
    msg = str(rec[0].message)
    assert msg.startswith("world size 2 -> 1: ")
    assert "24 samples into epoch 0 of the old order" in msg and "restarts epoch 0" in msg
    assert "RNGs" in msg and "step=6" in msg
    # The RNG is reseeded from (seed, step, rank): as the formula says, not the pre-restore state.
    after = torch.rand(4)
    seed_everything(reseed(7, 6, 0))
    assert torch.equal(after, torch.rand(4))
    # The stream keeps its epoch, restarts it in a new order (not the run's first order) and
    # its run-wide count continues from the old 2 x 24.
    st = stream2.state_dict()
    assert st["samples_consumed"] == 0 and st["global_samples_consumed"] == 48
    assert st["order_seed"] != 7
    fresh = indices(take(build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7), 2))
    resumed = indices(take(stream2, 2))
    assert not np.array_equal(fresh, resumed)
    assert stream2.position_record() == {"global_samples_consumed": 64, "world_size": 1, "epoch": 0}
    # Saving and resuming on the same world size keeps the new order exactly.
    path = ck.save(8, [phase], {"trainer": TrainState(step=8)}, {"stream": stream2, "rng": RNGState()},
                   data=stream2.position_record())
    assert json.loads((path / MANIFEST).read_text())["data"] == {
        "global_samples_consumed": 64, "world_size": 1, "epoch": 0}
    expected = indices(take(stream2, 2))
    stream3 = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    ck.restore([phase], {"trainer": TrainState()}, {"stream": stream3, "rng": RNGState()})
    assert np.array_equal(indices(take(stream3, 2)), expected)
    for s in (stream, stream2, stream3):
        s.close()


def test_a_later_epoch_is_kept_on_another_world_size(engine, tmp_path, ising_dir):
    phase, ck = _seeded(engine, tmp_path)
    stream = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    take(stream, 15)  # 120 samples: epoch 1 of 105 per epoch
    path = ck.save(15, [phase], {}, {"stream": stream}, data=stream.position_record())
    _pretend_saved_on(path, 2)  # 2 ranks x 52 per epoch: 120 is epoch 2, 16 in
    stream2 = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    with pytest.warns(ResumeWarning, match="16 samples into epoch 2 of the old order"):
        ck.restore([phase], {}, {"stream": stream2})
    assert stream2.position_record()["epoch"] == 2
    assert stream2.state_dict()["samples_consumed"] == 2 * 3 * NUM_PER_T
    stream.close()


def test_per_rank_state_that_cannot_reshard_is_an_error_not_skipped(engine, tmp_path):
    phase, ck = _seeded(engine, tmp_path)
    path = ck.save(2, [phase], {}, {"counter": Counter()})
    _pretend_saved_on(path, 2)
    with pytest.raises(CheckpointError, match="per-rank state 'counter' was saved on 2 ranks"):
        ck.restore([phase], {}, {"counter": Counter()})


def test_missing_per_rank_state_is_an_error(engine, tmp_path):
    phase, ck = _seeded(engine, tmp_path)
    ck.save(2, [phase], {}, {})
    with pytest.raises(CheckpointError, match="no per-rank state counter-rank00000.pt"):
        ck.restore([phase], {}, {"counter": Counter()})


def _damage(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def test_all_corrupt_names_each_and_deletes_nothing(engine, tmp_path):
    phase, ck = _seeded(engine, tmp_path)
    for step in (1, 2):
        ck.save(step, [phase], {"trainer": TrainState(step=step)}, {})
    _damage(ck.root / "step-00000002" / "model-vdm.pt")
    (ck.root / "step-00000001" / "trainer.pt").unlink()
    with pytest.raises(NoValidCheckpointError) as e:
        ck.restore([phase], {"trainer": TrainState()}, {})
    assert "step-00000002: " in str(e.value) and "checksum" in str(e.value)
    assert "step-00000001: " in str(e.value) and "trainer.pt is missing" in str(e.value)
    assert isinstance(e.value, ValueError)  # a ConfigError: the CLI exits 2 with one line
    assert sorted(d.name for d in ck.root.iterdir() if d.is_dir()) == ["step-00000001", "step-00000002"]


def test_retention_keeps_a_damaged_checkpoint_until_a_newer_valid_one_exists(engine, tmp_path):
    phase, ck = _setup(engine, tmp_path, keep_last=1)
    ck.save(5, [phase], {"trainer": TrainState(step=5)}, {})
    _damage(ck.root / "step-00000005" / "model-vdm.pt")
    ck.save(3, [phase], {"trainer": TrainState(step=3)}, {})  # e.g. resumed from an older one
    # keep_last=1 keeps the newest by step, the damaged 5 (nothing valid is newer); step 3 is the
    # newest valid one, so it stays too.
    names = sorted(d.name for d in ck.root.iterdir() if d.is_dir())
    assert names == ["step-00000003", "step-00000005"]
    _train_one(phase)
    ck.save(6, [phase], {"trainer": TrainState(step=6)}, {})
    assert sorted(d.name for d in ck.root.iterdir() if d.is_dir()) == ["step-00000006"]
