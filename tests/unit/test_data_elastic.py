"""Issue 16 section 1: one global sample order for any world size, worker count and split of
the global batch; exact resume onto another world size; corrupt substitutes independent of
the world size; ``pipeline shards order`` equals the in-process order. Real shards (written by
the shard writer) and real Streams; the reference is an uninterrupted 1-process run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.order import global_steps
from pipeline.data.stream import build_stream
from tests import conftest
from tests.unit.test_data_stream import NUM_PER_T, _truncate_after_sample, cfg_for, write_ising

N = 3 * NUM_PER_T  # 105 samples per epoch


@pytest.fixture(scope="module")
def ising_dir(tmp_path_factory) -> Path:
    return write_ising(tmp_path_factory.mktemp("elastic") / "s")


def _streams(urls, world_size: int, *, batch_per_rank: int, num_workers: int = 0, seed: int = 5):
    cfg = cfg_for(urls, batch_per_rank=batch_per_rank, num_workers=num_workers)
    return [build_stream(cfg, rank=r, world_size=world_size, seed=seed, with_keys=True) for r in range(world_size)]


def _run(streams, num_micro_steps: int) -> tuple[list[str], list[int]]:
    """Keys and global positions of ``num_micro_steps`` micro steps, rank-minor (the layout)."""
    keys, positions = [], []
    for _ in range(num_micro_steps):
        for s in streams:
            b = next(s)
            keys += b["key"]
            positions += b["index"].tolist()
    return keys, positions


def _close(streams) -> None:
    for s in streams:
        s.close()


def _reference(urls, num_samples: int, seed: int = 5) -> list[str]:
    """Keys of an uninterrupted 1-process run, ``num_samples`` long."""
    (s,) = _streams(urls, 1, batch_per_rank=1, seed=seed)
    keys, positions = _run([s], num_samples)
    s.close()
    assert positions == list(range(num_samples))
    return keys


def _states(streams) -> list[dict]:
    return [json.loads(json.dumps(s.state_dict())) for s in streams]


def _resumed(urls, states, world_size: int, *, batch_per_rank: int, num_workers: int = 0):
    streams = _streams(urls, world_size, batch_per_rank=batch_per_rank, num_workers=num_workers)
    for r, s in enumerate(streams):
        if len(states) == world_size:
            s.load_state_dict(states[r])
        else:
            s.load_elastic(states)
    return streams


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_same_global_order_for_any_ranks_and_workers(ising_dir, world_size, num_workers):
    ref = _reference(ising_dir, 3 * N)
    batch_per_rank = 7 if world_size != 2 else 5  # windows of ~20 samples: batches straddle them
    streams = _streams(ising_dir, world_size, batch_per_rank=batch_per_rank, num_workers=num_workers)
    num_micro = -(-3 * N // (world_size * batch_per_rank))  # a bit over 3 epochs
    keys, positions = _run(streams, num_micro)
    _close(streams)
    assert positions == list(range(len(positions)))
    assert keys[:3 * N] == ref
    for e in range(3):  # no remainder dropped: every sample exactly once per epoch
        assert len(set(keys[e * N:(e + 1) * N])) == N
    assert keys[:N] != keys[N:2 * N]  # each epoch a fresh shuffle


def test_the_split_into_ranks_and_micro_steps_does_not_change_a_step(ising_dir):
    g = 12
    per_split = {}
    for w, b in ((1, 12), (2, 6), (3, 4), (2, 3), (1, 4)):  # A = g / (w * b) micro steps
        per_split[(w, b)] = [rec["keys"] for rec in global_steps(
            str(ising_dir), global_batch=g, num_steps=12, world_size=w, batch_per_rank=b, seed=5,
            shuffle_buffer=20)]
    first = next(iter(per_split.values()))
    assert all(v == first for v in per_split.values())
    assert sum(first, []) == _reference(ising_dir, 12 * g)


@pytest.mark.parametrize("path", [(2, 1, 2), (1, 2), (2, 3, 1)])
def test_resume_onto_other_world_sizes_equals_uninterrupted(ising_dir, path):
    batch_per_rank, micro_per_leg = 4, 9  # 9 micro steps: legs end mid-window and mid-epoch
    keys: list[str] = []
    streams = _streams(ising_dir, path[0], batch_per_rank=batch_per_rank, num_workers=1)
    for w_next in list(path[1:]) + [None]:
        got, _ = _run(streams, micro_per_leg)
        keys += got
        states = _states(streams)
        _close(streams)
        if w_next is None:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-line notice that W x B changed
            streams = _resumed(ising_dir, states, w_next, batch_per_rank=batch_per_rank, num_workers=1)
        assert all(s.global_samples_consumed == len(keys) for s in streams)
    assert keys == _reference(ising_dir, len(keys))


def test_same_global_batch_on_another_world_size_is_silent(ising_dir):
    streams = _streams(ising_dir, 2, batch_per_rank=4)
    _run(streams, 3)
    states = _states(streams)
    _close(streams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (s,) = _resumed(ising_dir, states, 1, batch_per_rank=8)
    assert s.position_record() == {"global_samples_consumed": 24, "world_size": 1, "epoch": 0}
    s.close()


def test_a_changed_global_batch_continues_at_the_exact_position_with_one_line(ising_dir):
    streams = _streams(ising_dir, 2, batch_per_rank=4)
    first, _ = _run(streams, 5)  # 40 samples
    states = _states(streams)
    _close(streams)
    with pytest.warns(UserWarning) as rec:
        resumed = _resumed(ising_dir, states, 3, batch_per_rank=5)
    lines = [str(w.message) for w in rec]
    assert len(lines) == 1 and "2 x 4 = 8 to 3 x 5 = 15" in lines[0] and "global sample 40" in lines[0]
    rest, positions = _run(resumed, 5)  # 75 more: past the end of epoch 0 (105)
    _close(resumed)
    assert positions == list(range(40, 115))
    keys = first + rest
    assert len(set(keys[:N])) == N  # nothing repeated or skipped within the epoch
    assert keys == _reference(ising_dir, len(keys))


def test_changed_seed_or_data_is_named_and_starts_the_next_epoch(ising_dir, tmp_path):
    streams = _streams(ising_dir, 2, batch_per_rank=4)
    _run(streams, 3)
    states = _states(streams)
    _close(streams)
    (s,) = _streams(ising_dir, 1, batch_per_rank=4, seed=6)
    with pytest.warns(UserWarning, match="seed=5.*now seed=6.*start of epoch 1"):
        s.load_state_dict(states[0])
    assert s.global_samples_consumed == N
    s.close()


def test_version_1_states_convert_on_one_process_and_are_refused_otherwise(ising_dir):
    from pipeline.errors import ConfigError

    v1 = {"version": 1, "samples_consumed": 24, "corrupt_count": 0, "seed": 5, "order_seed": 5,
          "global_samples_consumed": 24, "world_size": 1, "num_samples": N, "batch_per_rank": 8}
    (s,) = _streams(ising_dir, 1, batch_per_rank=8)
    s.load_state_dict(v1)
    assert _run([s], 2)[0] == _reference(ising_dir, 40)[24:]
    s.close()
    (s,) = _streams(ising_dir, 1, batch_per_rank=8)
    for bad in ({**v1, "world_size": 2}, {**v1, "order_seed": 99}):
        with pytest.raises(ConfigError, match="version 1 .*no counterpart in the global order"):
            s.load_state_dict(bad)
    s.close()


def test_corrupt_substitutes_do_not_depend_on_the_world_size(tmp_path):
    d = write_ising(tmp_path / "s")
    from pipeline.data import shards

    first = shards.read_manifest(d)["shards"][0]
    _, lost = _truncate_after_sample(d / first["name"], keep=4)
    by_world = {}
    for w in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size check names the truncated shard
            streams = _streams(d, w, batch_per_rank=5)
        keys, positions = _run(streams, 42 // w)  # two epochs: 210 slots
        by_world[w] = (keys, sum(s.corrupt_count for s in streams))
        assert positions == list(range(210))
        _close(streams)
    assert by_world[1] == by_world[2]
    keys, corrupt = by_world[1]
    assert corrupt == 2 * len(lost)
    assert not {int(k) for k in keys} & lost


def test_order_cli_equals_in_process_and_its_resume_equals_no_resume(ising_dir):
    common = ["shards", "order", str(ising_dir), "--global-batch", "12", "--num-steps", "14", "--seed", "5",
              "--shuffle-buffer", "20"]
    plain = conftest.run_pipeline(*common, "--world-size", "2", "--num-workers", "2").stdout.splitlines()
    assert [line.split() for line in plain] == [
        rec["keys"] for rec in global_steps(str(ising_dir), global_batch=12, num_steps=14, world_size=3,
                                            seed=5, shuffle_buffer=20)]
    assert sum((line.split() for line in plain), []) == _reference(ising_dir, 12 * 14)
    resumed = conftest.run_pipeline(*common, "--world-size", "2", "--resume-at", "5", "--resume-world-size", "1",
                                    "--batch-per-rank", "6", "--json")
    recs = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert [r["keys"] for r in recs] == [line.split() for line in plain]
    assert [r["step"] for r in recs] == list(range(14)) and recs[-1]["epoch"] == 13 * 12 // N
    bad = conftest.run_pipeline(*common, "--world-size", "5", check=False)
    assert bad.returncode == 2 and "--global-batch 12 is not world size 5" in bad.stderr
    missing = conftest.run_pipeline("shards", "order", str(ising_dir / "nope"), "--global-batch", "4",
                                    "--num-steps", "1", check=False)
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr and "Traceback" not in missing.stderr
