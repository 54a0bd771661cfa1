"""Secrets never reach a run directory: the scrubber, then a real offline W&B run grepped."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.config import TrackConfig
from pipeline.track.secrets import REDACTED, Scrubber, is_secret_name
from pipeline.track.tracker import Tracker
from pipeline.track.wandb_reader import iter_records

FAKE_KEY = "fake-key-1234567890abcdef"
FAKE_HF = "hf_FAKEabcdefghijklmnopqrstuvwx"
FAKE_ARG = "cli-secret-0987654321"


@pytest.mark.parametrize(
    "name, secret",
    [("WANDB_API_KEY", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True), ("dbPassword", True),
     ("--api-key", True), ("track.auth_token", True), ("tokenizer", False), ("author", False),
     ("num_tokens", False), ("sort_key", False), ("run.dir", False)],
)
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_scrubber_by_env_value_name_and_shape():
    s = Scrubber({"WANDB_API_KEY": FAKE_KEY, "HOME": "/home/me", "SHORT_TOKEN": "1"})
    text = f"key {FAKE_KEY} at https://me:pw123@host/x, hf {FAKE_HF}, track.api_key=abc HOME=/home/me"
    out = s.text(text)
    assert FAKE_KEY not in out and "pw123" not in out and FAKE_HF not in out and "abc" not in out
    assert "/home/me" in out and "https://me:" in out  # non-secrets untouched
    cfg = {"data": {"hf_token": "anything", "tokenizer": "gpt2", "num_tokens": 5},
           "tags": [f"x{FAKE_KEY}"], "lr": 1e-3}
    assert s.value(cfg) == {"data": {"hf_token": REDACTED, "tokenizer": "gpt2", "num_tokens": 5},
                            "tags": [f"x{REDACTED}"], "lr": 1e-3}
    assert s.argv(["train", "--token", "abc123", "--api-key=xyz789", "run.dir=/tmp/r"]) == [
        "train", "--token", REDACTED, f"--api-key={REDACTED}", "run.dir=/tmp/r"]


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """Real wandb, offline, never the network; its caches inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def test_no_secret_in_any_file_of_an_offline_run(offline_wandb, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setattr(sys, "argv", ["pipeline", "train", "--hf-token", FAKE_ARG, f"notes={FAKE_KEY}"])
    run = tmp_path / "run"
    config = {
        "run": {"dir": str(run), "name": "marker-run-name"},
        "data": {"hf_token": FAKE_HF, "url": f"https://user:{FAKE_KEY}@example.org/data",
                 "marker": "visible-config-marker"},
        "notes": f"copied {FAKE_KEY} by mistake",
    }
    # "auto" with a key set would go online: WANDB_MODE=offline (set above) takes precedence.
    tr = Tracker(TrackConfig(wandb="auto", tags=[f"t-{FAKE_KEY}"]), run, config, is_main=True,
                 total_steps=4, resume=False)
    assert tr.mode == "offline"
    for step in (1, 2):
        tr.log({"vdm/bits_per_dim": 1.0 / step}, step=step)
    tr.log_event("data_error", message=f"GET https://host/?token={FAKE_KEY} failed")
    tr.log_images("samples", np.ones((2, 4, 4)), step=2)
    tr.close()
    print(f"[stdout is not a run file, but the tracker's lines went through it: {FAKE_KEY}]")
    files = [p for p in run.rglob("*") if p.is_file()]
    wandb_files = [p for p in files if p.suffix == ".wandb"]
    assert len(wandb_files) == 1 and len(files) > 5
    for path in files:
        data = path.read_bytes()
        for secret in (FAKE_KEY, FAKE_HF, FAKE_ARG):
            assert secret.encode() not in data, f"{secret} written to {path}"
    # The grep did reach the W&B data: the (scrubbed) config and meta are in the .wandb file.
    blob = wandb_files[0].read_bytes()
    assert b"visible-config-marker" in blob and b"marker-run-name" in blob
    run_record = next(r.run for r in iter_records(wandb_files[0]) if r.WhichOneof("record_type") == "run")
    config_keys = {item.key for item in run_record.config.update}
    assert {"run", "data", "notes", "meta"} <= config_keys
    assert FAKE_KEY not in "".join(capsys.readouterr().out.splitlines()[:-1])  # tracker's own stdout lines


@pytest.mark.parametrize("name", ["PWD", "OLDPWD", "pwd_dir", "run.pwd"])
def test_directory_names_are_not_secret_names(name):
    assert is_secret_name(name) is False


def test_paths_under_pwd_survive_in_every_run_file_and_tokens_do_not(monkeypatch, tmp_path):
    """Issue 15 item 7: $PWD (and a directory named after it) is provenance, not a credential."""
    work = tmp_path / "my_pwd_checkout"  # a directory whose name holds "pwd"
    run = work / "runs" / "r1"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(work))
    monkeypatch.setenv("OLDPWD", str(tmp_path / "pwd-old"))
    monkeypatch.setenv("HF_TOKEN", FAKE_KEY)
    monkeypatch.setenv("DB_PASSWD", "hunter2-is-long")
    monkeypatch.setattr(sys, "argv", ["pipeline", "train", f"run.dir={run}", f"data.train_urls={work}/data"])
    config = {"run": {"dir": str(run)}, "data": {"train_urls": f"{work}/data"}, "pwd_dir": str(work),
              "notes": f"token {FAKE_KEY} and password hunter2-is-long"}
    with Tracker(TrackConfig(wandb="off", progress_bar=False), run, config, is_main=True, total_steps=2,
                 resume=False) as tr:
        tr.log({"vdm/bits_per_dim": 1.0}, step=1)
        tr.log_event("checkpoint", step=1, path=run / "checkpoints" / "step-00000001")
        assert tr.config["run"]["dir"] == str(run) and tr.config["pwd_dir"] == str(work)  # what W&B gets
    text = (run / "metrics.jsonl").read_text() + (run / "track.json").read_text()
    assert f"{run}/checkpoints/step-00000001" in text  # event field under $PWD
    assert f"run.dir={run}" in text and f"data.train_urls={work}/data" in text  # command line in track.json
    assert FAKE_KEY not in text and FAKE_KEY not in str(tr.config)
    assert "hunter2-is-long" not in str(tr.config) and REDACTED in tr.config["notes"]
