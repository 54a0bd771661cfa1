"""Issue 15 "Nothing silent", through the real CLI: a 2 -> 1 -> 2 process resume says what it
lost and the manifests record where the data stream stands. (A run directory whose checkpoints
are all damaged, a misspelt data.label_key and the other single-command cases are rows of
tests/faults/test_matrix.py.)"""

from __future__ import annotations

import json
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


def test_world_size_2_to_1_to_2_warns_and_keeps_the_data_position(tmp_path, ising_shards):
    run = tmp_path / "run"
    conftest.accelerate_launch(2, *_args(run, ising_shards, 4))
    assert _data(run, 4) == {"global_samples_consumed": 2 * 4 * BATCH, "world_size": 2, "epoch": 0}
    assert _stream(run, 4)["samples_consumed"] == 4 * BATCH

    r = conftest.run_pipeline(*_args(run, ising_shards, 8))
    assert "ResumeWarning: world size 2 -> 1: the data stream's position (32 samples into epoch 0" in r.stderr
    assert "RNGs cannot be mapped onto 1 rank(s) and are reseeded from (seed=" in r.stderr
    # Two steps on one rank after the resume at step 4: the run-wide count continues.
    assert _data(run, 6) == {"global_samples_consumed": 2 * 4 * BATCH + 2 * BATCH, "world_size": 1, "epoch": 0}
    s6 = _stream(run, 6)
    assert s6["samples_consumed"] == 2 * BATCH  # into epoch 0 of the new order...
    assert s6["order_seed"] != s6["seed"]  # ...which is not the run's first order

    r = conftest.accelerate_launch(2, *_args(run, ising_shards, 10))
    # The 1-rank run stood 4 steps into its own order at step 8.
    assert "world size 1 -> 2: the data stream's position (32 samples into epoch 0" in r.stderr
    assert _data(run, 10) == {"global_samples_consumed": 8 * BATCH + 2 * 2 * 2 * BATCH, "world_size": 2, "epoch": 0}
    s10 = [_stream(run, 10, rank) for rank in (0, 1)]
    assert [s["samples_consumed"] for s in s10] == [2 * BATCH, 2 * BATCH]
    assert s10[0]["order_seed"] not in (s6["order_seed"], s6["seed"])
