"""The run directory through the real CLI (1 process): nothing silent.

An empty run.dir is refused (issue 15 item 6); a resume with a config that changes the model
is refused before anything is written, one that changes the optimisation names the keys,
one that only extends the run says nothing (item 3); a diverged run is recorded as failed in
metrics.jsonl and W&B (item 4); the data's metadata is read once on the way in (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.run_dir import RunDir
from tests.conftest import REPO, run_pipeline
from tests.conftest import subprocess_env as launch_env  # (not collected as a test)

pytestmark = pytest.mark.integration

TINY = ["train.log_every_steps=1", "train.warmup_steps=0", "vdm.num_timesteps=10", "vdm.channels=8",
        "data.batch_per_rank=16", "data.num_workers=0", "track.wandb=offline", "track.progress_bar=false",
        "train.num_sample_images=16", "train.checkpoint_every_steps=2"]


def _train(run: Path, shards: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_pipeline("train", "--config", "configs/quickstart.yaml", f"run.dir={run}",
                        f"data.train_urls={shards}", *TINY, *extra, check=check)


def _close_events(rd: RunDir) -> list[dict]:
    return [d for d in map(json.loads, rd.metrics.read_text().splitlines()) if d.get("event") == "close"]


def _wandb_exit_codes(rd: RunDir) -> list[int]:
    from pipeline.track.wandb_reader import find_run_files, iter_records

    return [r.exit.exit_code for f in find_run_files(rd.root) for r in iter_records(f)
            if r.WhichOneof("record_type") == "exit"]


@pytest.mark.parametrize("value", ["", "'  '"])
def test_empty_run_dir_is_refused_before_anything_is_written(value, tmp_path, ising_shards):
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(REPO / "configs/quickstart.yaml"),
                        f"run.dir={value}", f"data.train_urls={ising_shards}", "train.num_steps=1", "train.warmup_steps=0",
                        "track.wandb=off", "data.num_workers=0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=launch_env(PYTHONPATH=str(REPO)))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "run.dir=" in r.stderr and "empty" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained into the current directory


def test_resume_refuses_a_different_model_warns_on_optimisation_and_extends_silently(tmp_path, ising_shards):
    rd = RunDir(tmp_path / "run")
    _train(rd.root, ising_shards, "train.num_steps=2")
    assert _close_events(rd)[-1]["failed"] is False and _close_events(rd)[-1]["exit_code"] == 0
    before = {p: p.read_bytes() for p in (rd.config, rd.metrics, rd.track_state)}
    checkpoints = sorted(p.name for p in rd.checkpoints.iterdir())

    # A different model (and an lr change, which alone would only warn): refused, nothing written.
    r = _train(rd.root, ising_shards, "train.num_steps=4", "vdm.channels=16", "vdm.schedule=cosine",
               "train.lr=0.001", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "vdm.channels: 8 -> 16" in r.stderr and "vdm.schedule: 'linear' -> 'cosine'" in r.stderr
    errors = r.stderr.split("cannot be resumed: ")[1].split(". Use a new")[0]
    assert "train.lr" not in errors  # an optimisation key is not among the errors
    assert "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == checkpoints

    # Longer: the documented way to train on; no warning of any kind about the config.
    r = _train(rd.root, ising_shards, "train.num_steps=3", "train.log_every_steps=2")
    assert "resumed from step 2" in r.stdout
    assert "warning: resuming" not in r.stderr and "config hash" not in r.stderr, r.stderr[-3000:]

    # An optimisation key: resumed, with the key named (old and new value); config.yaml updated.
    r = _train(rd.root, ising_shards, "train.num_steps=4", "train.lr=0.001", "data.shuffle_buffer=50")
    assert "resumed from step 3" in r.stdout
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning: resuming"))
    assert "train.lr: 0.0005 -> 0.001" in warning and "data.shuffle_buffer: 1000 -> 50" in warning
    assert "train.num_steps" not in warning
    from pipeline.config import read_saved_config

    saved = read_saved_config(rd.config)
    assert saved["train.lr"] == 0.001 and saved["train.num_steps"] == 4


def test_a_diverged_run_is_recorded_as_failed(tmp_path):
    """Every sample NaN: every step is skipped until train.max_bad_steps stops the run."""
    np.save(tmp_path / "x.npy", np.full((64, 1, 8, 8), np.nan, dtype=np.float32))
    shards = tmp_path / "nan"
    run_pipeline("shards", "npy", "--x", str(tmp_path / "x.npy"), "--data-kind", "continuous",
                 "--out", str(shards), "--val-fraction", "0", "--samples-per-shard", "32")
    rd = RunDir(tmp_path / "run")
    r = _train(rd.root, shards, "vdm.data_kind=auto", "train.num_steps=10", "train.max_bad_steps=2", check=False)
    assert r.returncode == 1 and "TrainingDiverged" in r.stderr, r.stderr[-3000:]
    (close,) = _close_events(rd)
    assert close["failed"] is True and close["exit_code"] == 1
    (error,) = [d for d in map(json.loads, rd.metrics.read_text().splitlines()) if d.get("event") == "error"]
    assert error["error"].startswith("TrainingDiverged: 2 consecutive steps with NaN/Inf")
    assert _wandb_exit_codes(rd) == [1]


_COUNT_META = """
import sys
import pipeline.data.stream as stream
calls = []
real = stream.read_meta
def counted(urls):
    calls.append(urls)
    return real(urls)
stream.read_meta = counted
import pipeline.train.loop as loop
loop.read_meta = counted
from pipeline.cli import main
code = main(sys.argv[1:])
print("read_meta calls:", len(calls))
sys.exit(code)
"""


def test_data_meta_is_read_once_on_the_way_into_training(tmp_path, ising_shards):
    run = tmp_path / "run"
    last = len(list(ising_shards.glob("train-*.tar"))) - 1
    shards = f"{ising_shards}/train-{{000000..{last:06d}}}.tar"  # shard paths, not the manifest directory
    r = subprocess.run([sys.executable, "-c", _COUNT_META, "train", "--config", "configs/quickstart.yaml",
                        f"run.dir={run}", f"data.train_urls={shards}", *TINY, "train.num_steps=1",
                        "track.wandb=off"], cwd=REPO, capture_output=True, text=True, timeout=600, env=launch_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read_meta calls: 1" in r.stdout, r.stdout[-2000:]
