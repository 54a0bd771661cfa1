"""Tracker without W&B (track.wandb=off): metrics.jsonl, resume guard, run ids, ranks, close."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, TrackConfig
from pipeline.track.tracker import Tracker, resolve_wandb_mode


def _cfg(**kw) -> TrackConfig:
    return TrackConfig(wandb="off", progress_bar=False, **kw)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _metric_steps(run_dir: Path) -> list[int]:
    return [d["step"] for d in _lines(run_dir) if "event" not in d]


def test_metrics_jsonl_lines_are_flushed_json_with_step_time_and_values(tmp_path, capsys):
    tr = Tracker(_cfg(), tmp_path, {"train": {"lr": 1e-3}}, is_main=True, total_steps=100, resume=False)
    tr.log({"vdm/bits_per_dim": np.float32(1.5), "lr": torch.tensor(2e-4), "count": 3}, step=1)
    tr.log({"vdm/bits_per_dim": float("nan"), "lr": 2e-4, "count": True}, step=2)
    # Read before close: every line is on disk already (a crash would not lose it).
    rows = [d for d in _lines(tmp_path) if "event" not in d]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["vdm/bits_per_dim"] == 1.5 and rows[0]["lr"] == pytest.approx(2e-4) and rows[0]["count"] == 3
    assert rows[1]["vdm/bits_per_dim"] is None  # NaN -> null: strict JSON
    assert rows[1]["count"] == 1
    assert rows[0]["time"] <= rows[1]["time"]
    assert _lines(tmp_path)[0]["event"] == "start"
    tr.close()
    assert _lines(tmp_path)[-1]["event"] == "close"
    out = capsys.readouterr().out
    assert "step 2/100" in out and "vdm/bits_per_dim nan/inf" in out and "lr 0.0002" in out


def test_resume_never_logs_a_step_twice(tmp_path):
    cfg = _cfg()
    first = Tracker(cfg, tmp_path, {}, is_main=True, total_steps=20, resume=False)
    for step in range(1, 7):
        first.log({"loss": float(step)}, step=step)
    run_id = first.run_id
    del first  # crash: never closed; lines are flushed already
    # Checkpoint was at step 3: the loop recomputes 4..6 and goes on to 9.
    second = Tracker(cfg, tmp_path, {}, is_main=True, total_steps=20, resume=True)
    assert second.resume_step == 6 and second.run_id == run_id
    for step in range(4, 10):
        second.log({"loss": 100.0 + step}, step=step)
    second.log({"loss": 0.0}, step=8)  # going backwards within a session is dropped too
    second.close()
    assert _metric_steps(tmp_path) == list(range(1, 10))
    losses = {d["step"]: d["loss"] for d in _lines(tmp_path) if "event" not in d}
    assert losses[5] == 5.0 and losses[9] == 109.0  # first value of a step is kept
    assert second.num_dropped_steps == 4
    state = json.loads((tmp_path / "track.json").read_text())
    assert state["last_step"] == 9 and state["wandb_run_id"] == run_id and len(state["segments"]) == 2
    assert state["segments"][1]["resumed_after_step"] == 6


def test_resume_step_recovered_from_metrics_when_state_lags_and_torn_line_cut(tmp_path):
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=20, resume=False)
    tr.log({"loss": 1.0}, step=5)
    tr.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step":7,"time":1.0,"loss":2.0}\n{"step":8,"ti')  # state.json says 5; a torn tail
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=20, resume=True)
    assert tr.resume_step == 7
    tr.log({"loss": 3.0}, step=8)
    tr.close()
    assert _metric_steps(tmp_path) == [5, 7, 8]  # every line parses: the torn one was cut


def test_run_id_from_config_then_persisted(tmp_path, capsys):
    tr = Tracker(_cfg(run_id="slurm-1234"), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr.close()
    assert json.loads((tmp_path / "track.json").read_text())["wandb_run_id"] == "slurm-1234"
    tr = Tracker(_cfg(run_id="slurm-9999"), tmp_path, {}, is_main=True, total_steps=10, resume=True)
    tr.close()
    assert tr.run_id == "slurm-1234"  # the resumed run continues the same W&B run ...
    assert "track.run_id=slurm-9999 ignored" in capsys.readouterr().out  # ... and says so
    with pytest.raises(ConfigError, match="track.run_id"):
        Tracker(_cfg(run_id="a/b"), tmp_path / "x", {}, is_main=True, total_steps=10, resume=False)


def test_fresh_start_in_used_dir_keeps_old_metrics_aside(tmp_path):
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr.log({"loss": 1.0}, step=3)
    tr.close()
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr.log({"loss": 1.0}, step=1)  # not dropped: this is a new run
    tr.close()
    assert _metric_steps(tmp_path) == [1]
    (old,) = tmp_path.glob("metrics.*.jsonl")
    assert [json.loads(x).get("step") for x in old.read_text().splitlines()][1] == 3


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    tr = Tracker(_cfg(), run, {}, is_main=False, total_steps=10, resume=False)
    tr.log({"loss": 1.0}, step=1)
    tr.log_event("checkpoint", path="x")
    assert tr.log_images("s", np.ones((2, 4, 4)), step=1) is None
    tr.close()
    assert not run.exists()


def test_close_twice_and_after_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False) as tr:
            tr.log({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    tr.close()
    tr.log({"loss": 2.0}, step=2)  # after close: ignored, no error
    closes = [d for d in _lines(tmp_path) if d.get("event") == "close"]
    assert len(closes) == 1 and closes[0]["failed"] is True and closes[0]["exit_code"] == 1
    assert _metric_steps(tmp_path) == [1]


@pytest.mark.parametrize("failed, exit_code, expected", [(False, None, 0), (False, 75, 75), (True, None, 1),
                                                          (True, 2, 2)])
def test_close_records_failure_and_exit_code(tmp_path, failed, exit_code, expected):
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr.close(failed=failed, exit_code=exit_code)
    (close,) = [d for d in _lines(tmp_path) if d.get("event") == "close"]
    assert close["failed"] is failed and close["exit_code"] == expected


def test_a_failure_cannot_claim_exit_code_0(tmp_path):
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    with pytest.raises(AssertionError):
        tr.close(failed=True, exit_code=0)
    tr.close(failed=True)  # the refused call closed nothing
    assert [d["exit_code"] for d in _lines(tmp_path) if d.get("event") == "close"] == [1]


def test_events_images_and_bad_metrics(tmp_path, capsys):
    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr.log({"loss": 1.0}, step=10)
    tr.log_event("checkpoint", step=10, path=tmp_path / "ckpt", seconds=0.25)
    path = tr.log_images("gen/samples", np.sign(np.random.default_rng(0).normal(size=(4, 1, 8, 8))), step=10)
    with pytest.raises(ValueError, match="'step' is reserved"):
        tr.log({"step": 1.0}, step=11)
    with pytest.raises(ValueError, match="'loss' must be a number"):
        tr.log({"loss": "high"}, step=11)
    tr.close()
    assert path == tmp_path / "samples" / "gen_samples-0000010.png" and path.is_file()
    events = [d for d in _lines(tmp_path) if "event" in d]
    ck = next(e for e in events if e["event"] == "checkpoint")
    assert ck["step"] == 10 and ck["path"] == str(tmp_path / "ckpt") and ck["seconds"] == 0.25
    img = next(e for e in events if e["event"] == "image")
    assert img["path"] == "samples/gen_samples-0000010.png" and img["num_images"] == 4
    assert "[event] checkpoint step=10" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setting, env, has_netrc, expected",
    [
        ("auto", {}, False, "offline"),
        ("auto", {"WANDB_API_KEY": "k" * 40}, False, "online"),
        ("auto", {}, True, "online"),
        ("auto", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, False, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, True, "off"),
        ("offline", {"WANDB_API_KEY": "k" * 40}, True, "offline"),
        ("off", {}, False, "off"),
        ("online", {}, False, "online"),
    ],
)
def test_resolve_wandb_mode(tmp_path, setting, env, has_netrc, expected):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password p\n" if has_netrc else "")
    assert resolve_wandb_mode(setting, env, netrc_file=str(netrc)) == expected


def test_resolve_wandb_mode_rejects_unknown_setting():
    with pytest.raises(ConfigError, match="track.wandb='yes'.*'auto', 'online', 'offline', 'off'"):
        resolve_wandb_mode("yes", {})


def test_wandb_failure_mid_run_does_not_stop_file_logging(tmp_path, capsys):
    """SLURM signals every process of a step, W&B's service included: its death must not
    kill training (which still has a checkpoint to write); metrics.jsonl keeps going."""

    class DeadRun:
        calls = 0

        def log(self, data, step):
            DeadRun.calls += 1
            raise ConnectionResetError("service gone")

        def finish(self, exit_code=0):
            raise AssertionError("finish must not be called on a run already dropped")

    tr = Tracker(_cfg(), tmp_path, {}, is_main=True, total_steps=10, resume=False)
    tr._wandb_run = DeadRun()
    tr.log({"loss": 1.0}, step=1)
    tr.log({"loss": 0.5}, step=2)
    tr.close()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "event" not in json.loads(l)]
    assert steps == [1, 2] and DeadRun.calls == 1
    assert "W&B logging failed" in capsys.readouterr().err


def test_track_json_is_written_durably(tmp_path, monkeypatch):
    """atomic_write_json goes through pipeline.atomic.atomic_write_text: the data and the
    directory are fsynced before and after the rename, and no temporary file is left."""
    import json as _json
    import os as _os

    from pipeline.track.jsonl import atomic_write_json

    synced: list[int] = []
    real_fsync = _os.fsync
    monkeypatch.setattr(_os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "track.json"
    atomic_write_json(target, {"last_step": 3, "segments": [{"host": "h"}]})
    assert len(synced) == 2  # the file's data, then the directory entry
    assert _json.loads(target.read_text()) == {"last_step": 3, "segments": [{"host": "h"}]}
    assert target.read_text() == _json.dumps({"last_step": 3, "segments": [{"host": "h"}]}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["track.json"]
