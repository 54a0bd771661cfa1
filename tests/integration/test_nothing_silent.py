"""Issue 15 "Nothing silent", through the real CLI: a 2 -> 1 -> 2 process resume continues the
data stream at the exact global sample (issue 16), says what it lost (the per-rank RNGs) and
the manifests record where the data stream stands. (A run directory whose checkpoints are all
damaged, a misspelt data.label_key and the other single-command cases are rows of
tests/faults/test_matrix.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import conftest
from tests.integration.test_exact_resume import train_args

pytestmark = pytest.mark.integration

BATCH = 8  # data.batch_per_rank in COMMON; the VDM consumes one batch per rank per step


def _args(run: Path, shards: Path, num_steps: int) -> list[str]:
    return train_args(run, shards, "vdm", f"train.num_steps={num_steps}", "train.checkpoint_every_steps=2",
                      "train.keep_last_checkpoints=20", "train.sample_every_steps=0")


def _data(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())["data"]


def _stream(run: Path, step: int, rank: int = 0) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / f"stream-rank{rank:05d}.pt", weights_only=True)


def test_world_size_2_to_1_to_2_continues_the_data_stream_exactly(tmp_path, ising_shards):
    run = tmp_path / "run"
    conftest.accelerate_launch(2, *_args(run, ising_shards, 4))
    assert _data(run, 4) == {"global_samples_consumed": 2 * 4 * BATCH, "world_size": 2, "epoch": 0}
    assert [_stream(run, 4, rank)["global_samples_consumed"] for rank in (0, 1)] == [2 * 4 * BATCH] * 2

    r = conftest.run_pipeline(*_args(run, ising_shards, 8))
    # What is lost on a world-size change is the per-rank RNGs, and only that is warned about...
    assert "ResumeWarning: world size 2 -> 1: the per-rank RNGs cannot be mapped onto 1 rank(s)" in r.stderr
    assert "data stream's position" not in r.stderr and "restarts" not in r.stderr
    # ...the stream continues at the next global sample; one line says its micro batches changed.
    assert r.stderr.count("samples per micro step over all ranks") == 1
    assert "changed from 2 x 8 = 16 to 1 x 8 = 8; continuing exactly at global sample 64" in r.stderr
    assert _data(run, 6) == {"global_samples_consumed": 2 * 4 * BATCH + 2 * BATCH, "world_size": 1, "epoch": 0}
    assert _stream(run, 6)["global_samples_consumed"] == 80

    r = conftest.accelerate_launch(2, *_args(run, ising_shards, 10))
    assert "world size 1 -> 2: the per-rank RNGs" in r.stderr and "data stream's position" not in r.stderr
    assert "continuing exactly at global sample 96" in r.stderr
    assert _data(run, 10) == {"global_samples_consumed": 8 * BATCH + 4 * BATCH + 2 * 2 * BATCH, "world_size": 2,
                              "epoch": 0}
    assert [_stream(run, 10, rank)["global_samples_consumed"] for rank in (0, 1)] == [128, 128]


def test_corrupt_sample_count_is_summed_over_ranks_and_equals_one_process(tmp_path, ising_shards):
    from pipeline.data import shards
    from tests.unit.test_data_stream import _truncate_after_sample

    data = tmp_path / "data"
    shutil.copytree(ising_shards, data)
    for s in shards.read_manifest(data)["shards"]:
        if s["split"] == "train":
            _truncate_after_sample(data / s["name"], keep=s["num_samples"] // 2)  # half of each corrupt
    # The same global batch of 16 on 2 ranks x 8 and on 1 x 16: the same global positions.
    conftest.accelerate_launch(2, *_args(tmp_path / "two", data, 3))
    conftest.run_pipeline(*_args(tmp_path / "one", data, 3), "data.batch_per_rank=16")
    counts = []
    for run in ("two", "one"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        counts.append([r["data/corrupt_samples"] for r in rows if "data/corrupt_samples" in r])
    assert counts[0] == counts[1] and counts[0][-1] > 0, counts
