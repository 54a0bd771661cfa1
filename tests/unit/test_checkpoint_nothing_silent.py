"""Issue 15 "Nothing silent": a world-size change continues the data stream exactly and never
skips other per-rank state without a warning saying what was lost; all-corrupt checkpoints stop the resume and are never deleted; the
manifest records the data position (1 process; the world size of a saved checkpoint is
rewritten in its manifest, which the checksums do not cover)."""

import json
import warnings

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


def _rewrite(directory, name: str, state: dict, m: dict) -> None:
    torch.save(state, directory / name)
    m["files"][name] = {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}


def _pretend_saved_on(directory, world_size: int) -> None:
    """Rewrite a checkpoint as if ``world_size`` ranks had saved it: rank 0's stream state
    copied onto every rank, each with ``batch_per_rank / world_size`` (the same samples per
    micro step over all ranks) and corrupt count rank + 1; other per-rank files kept as rank 0's."""
    m = json.loads((directory / MANIFEST).read_text())
    m["world_size"] = world_size
    stream = directory / "stream-rank00000.pt"
    if stream.is_file():
        state = torch.load(stream, weights_only=True)
        for r in range(world_size):
            _rewrite(directory, f"stream-rank{r:05d}.pt", {
                **state, "world_size": world_size, "rank": r, "corrupt_count": r + 1,
                "batch_per_rank": state["batch_per_rank"] // world_size}, m)
    (directory / MANIFEST).write_text(json.dumps(m))


def _seeded(engine, tmp_path):
    phase, _ = _setup(engine, tmp_path)
    return phase, Checkpointer(tmp_path / "ckpt", engine, keep_last=3, keep_every=None, config_hash="abc", seed=7)


def test_other_world_size_continues_the_stream_exactly_and_warns_only_about_the_rngs(engine, tmp_path, ising_dir):
    phase, ck = _seeded(engine, tmp_path)
    stream = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    take(stream, 3)  # 24 samples into epoch 0
    path = ck.save(6, [phase], {"trainer": TrainState(step=6)}, {"stream": stream, "rng": RNGState()},
                   data=stream.position_record())
    expected = indices(take(stream, 2))  # what the uninterrupted run reads next
    _pretend_saved_on(path, 2)  # as if 2 ranks x 4 had consumed 3 micro steps
    stream2 = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ck.restore([phase], {"trainer": TrainState()}, {"stream": stream2, "rng": RNGState()})
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and isinstance(rec[0].message, ResumeWarning), msgs  # 2 x 4 = 1 x 8: no stream line
    assert msgs[0].startswith("world size 2 -> 1: ") and "RNGs" in msgs[0] and "step=6" in msgs[0]
    assert "data stream" not in msgs[0] and "restart" not in msgs[0]
    # The RNG is reseeded from (seed, step, rank): as the formula says, not the pre-restore state.
    after = torch.rand(4)
    seed_everything(reseed(7, 6, 0))
    assert torch.equal(after, torch.rand(4))
    # The stream continues at the exact global position; rank 0 carries both old corrupt counts.
    assert stream2.position_record() == {"global_samples_consumed": 24, "world_size": 1, "epoch": 0}
    assert stream2.corrupt_count == 1 + 2
    assert np.array_equal(indices(take(stream2, 2)), expected)
    # Saving and resuming on the same world size keeps the position exactly.
    path = ck.save(8, [phase], {"trainer": TrainState(step=8)}, {"stream": stream2, "rng": RNGState()},
                   data=stream2.position_record())
    assert json.loads((path / MANIFEST).read_text())["data"] == {
        "global_samples_consumed": 40, "world_size": 1, "epoch": 0}
    expected = indices(take(stream2, 2))
    stream3 = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    ck.restore([phase], {"trainer": TrainState()}, {"stream": stream3, "rng": RNGState()})
    assert np.array_equal(indices(take(stream3, 2)), expected)
    for s in (stream, stream2, stream3):
        s.close()


def test_a_version_1_stream_state_of_two_ranks_is_refused_by_name(engine, tmp_path, ising_dir):
    phase, ck = _seeded(engine, tmp_path)
    stream = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)
    path = ck.save(15, [phase], {}, {"stream": stream}, data=stream.position_record())
    m = json.loads((path / MANIFEST).read_text())
    v1 = {"version": 1, "samples_consumed": 16, "corrupt_count": 0, "seed": 7, "order_seed": 7,
          "global_samples_consumed": 32, "world_size": 2, "num_samples": 3 * NUM_PER_T, "batch_per_rank": 8}
    _rewrite(path, "stream-rank00000.pt", v1, m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="version 1 saved on 2 rank.*fresh run.dir"):
        ck.restore([phase], {}, {"stream": build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=7)})
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
    _damage(ck.root / "step-00000002" / "ddp-vdm" / "__0_0.distcp")
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
    _damage(ck.root / "step-00000005" / "ddp-vdm" / "__0_0.distcp")
    ck.save(3, [phase], {"trainer": TrainState(step=3)}, {})  # e.g. resumed from an older one
    # keep_last=1 keeps the newest by step, the damaged 5 (nothing valid is newer); step 3 is the
    # newest valid one, so it stays too.
    names = sorted(d.name for d in ck.root.iterdir() if d.is_dir())
    assert names == ["step-00000003", "step-00000005"]
    _train_one(phase)
    ck.save(6, [phase], {"trainer": TrainState(step=6)}, {})
    assert sorted(d.name for d in ck.root.iterdir() if d.is_dir()) == ["step-00000006"]
