"""RunDir: the one place the layout of a run directory is spelled out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.run_dir import RunDir


def test_paths_are_under_the_root_and_distinct(tmp_path):
    rd = RunDir(str(tmp_path / "r"))
    assert rd.root == tmp_path / "r" and isinstance(rd.root, Path)
    names = ["config", "checkpoints", "export", "export_partial", "export_old", "metrics", "track_state",
             "samples", "wandb", "report", "eval_cache"]
    paths = [getattr(rd, n) for n in names]
    assert all(p.parent == rd.root for p in paths)
    assert len(set(paths)) == len(paths)
    assert (rd.config.name, rd.metrics.name, rd.track_state.name) == ("config.yaml", "metrics.jsonl", "track.json")
    assert not (tmp_path / "r").exists()  # names only: nothing is created


def test_frozen_and_equal_by_root(tmp_path):
    rd = RunDir(tmp_path)
    assert rd == RunDir(str(tmp_path)) and hash(rd) == hash(RunDir(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rd.root = tmp_path / "other"  # type: ignore[misc]


def test_the_writers_and_readers_use_it(tmp_path):
    """What the tracker writes is where RunDir says, and the report and W&B reader find it there."""
    from pipeline.config import TrackConfig
    from pipeline.track.report import make_report
    from pipeline.track.tracker import Tracker

    rd = RunDir(tmp_path / "run")
    with Tracker(TrackConfig(wandb="off", progress_bar=False), rd.root, {}, is_main=True, total_steps=3,
                 resume=False) as tr:
        for step in (1, 2, 3):
            tr.log({"vdm/bits_per_dim": 1.0 / step}, step=step)
        tr.log_images("samples", -1.0 + 2.0 * (np.arange(32).reshape(2, 1, 4, 4) % 2), step=3)
    assert rd.metrics.is_file() and rd.track_state.is_file()
    assert [p.parent for p in rd.root.rglob("*.png")] == [rd.samples]
    written = make_report(rd.root)
    assert written and all(p.parent == rd.report for p in written)
