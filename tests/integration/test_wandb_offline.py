"""A real W&B run in offline mode (no network), stopped and resumed, read back from the
``.wandb`` files with our reader: the expected keys, one continuous step axis, one run id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import TrackConfig
from pipeline.track.tracker import Tracker
from pipeline.track.wandb_reader import find_run_files, history_of_file, iter_records, read_history

pytestmark = pytest.mark.integration

ELBO = ("vdm/recon_bpd", "vdm/prior_bpd", "vdm/diffusion_bpd", "vdm/bits_per_dim")


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def _metrics(step: int) -> dict[str, float]:
    recon, prior, diff = 0.01 + 1e-4 * step, 1e-5, 1.0 / step
    return {"vdm/recon_bpd": recon, "vdm/prior_bpd": prior, "vdm/diffusion_bpd": diff,
            "vdm/bits_per_dim": recon + prior + diff, "lr": 2e-4}


def test_offline_run_resumed_has_one_continuous_step_axis(offline_wandb, tmp_path):
    run = tmp_path / "run"
    cfg = TrackConfig(wandb="auto", progress_bar=False)
    config = {"run": {"dir": str(run), "name": "wandb-offline-test"}, "train": {"num_steps": 400}}
    with Tracker(cfg, run, config, is_main=True, total_steps=400, resume=False) as first:
        assert first.mode == "offline"
        for step in range(1, 6):
            first.log(_metrics(step), step=step)
        first.log_images("samples", np.sign(np.random.default_rng(0).normal(size=(4, 1, 8, 8))), step=5)
        first.log_event("checkpoint", step=5, path=str(run / "ckpt"), seconds=0.5)
    # Restart from a checkpoint at step 2: steps 3..5 are recomputed; the run goes on to 400
    # (enough history to span several 32 KiB blocks of the log file).
    with Tracker(cfg, run, config, is_main=True, total_steps=400, resume=True) as second:
        assert second.run_id == first.run_id
        for step in range(3, 401):
            second.log(_metrics(step), step=step)
    assert second.num_dropped_steps == 3

    files = find_run_files(run)
    assert len(files) == 2  # one offline-run-* directory per segment
    assert files[1].stat().st_size > 2 * 32768
    run_ids = [next(r.run.run_id for r in iter_records(f) if r.WhichOneof("record_type") == "run") for f in files]
    assert run_ids == [first.run_id, first.run_id]  # `wandb sync` uploads both into one run

    seg = [[h["_step"] for h in history_of_file(f) if "vdm/bits_per_dim" in h] for f in files]
    assert seg == [[1, 2, 3, 4, 5], list(range(6, 401))]

    history = read_history(run)
    rows = [h for h in history if "vdm/bits_per_dim" in h]
    assert [h["_step"] for h in rows] == list(range(1, 401))
    for h in rows:
        expected = _metrics(h["_step"])
        for key in (*ELBO, "lr"):
            assert h[key] == pytest.approx(expected[key], rel=1e-12), (h["_step"], key)
    # Step 5 carries the sample grid and the checkpoint event besides the scalars.
    row5 = next(h for h in history if h["_step"] == 5)
    assert row5["samples/samples._type"] == "image-file" and row5["events/checkpoint/seconds"] == 0.5
    # metrics.jsonl agrees with W&B.
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in jsonl if "event" not in d] == list(range(1, 401))


def test_reader_tolerates_a_torn_file_and_rejects_a_foreign_one(offline_wandb, tmp_path):
    run = tmp_path / "run"
    with Tracker(TrackConfig(wandb="offline", progress_bar=False), run, {}, True, 50, False) as tr:
        for step in range(1, 51):
            tr.log({"vdm/bits_per_dim": float(step)}, step=step)
    (path,) = find_run_files(run)
    full = [h["_step"] for h in history_of_file(path) if "vdm/bits_per_dim" in h]
    assert full == list(range(1, 51))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])  # a crash mid-write
    part = [h["_step"] for h in history_of_file(torn) if "vdm/bits_per_dim" in h]
    assert 0 < len(part) < 50 and part == full[: len(part)]
    foreign = tmp_path / "foreign.wandb"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a W&B run file"):
        history_of_file(foreign)
    with pytest.raises(FileNotFoundError, match="no W&B run files"):
        read_history(tmp_path / "nothing")
