"""Asynchronous checkpoints (train.async_checkpoint) of the real `pipeline train` (VDM, DDP,
2 CPU processes): a SIGKILL of one rank while a checkpoint is written in the background loses
nothing, and the resumed run ends bitwise equal to the uninterrupted synchronous run."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests import conftest
from tests.integration.test_exact_resume import (
    EVERY, NUM_STEPS, Launch, assert_bitwise_equal, final_state, latest, logged_steps, metric_rows, _start_reference,
    TRAIN_RUNS, reference_run, runs_root, train_args,
)

pytestmark = pytest.mark.integration
__all__ = ["runs_root"]  # the shared fixture, re-exported for this module

ASYNC = "train.async_checkpoint=true"
DELAY_S = 5


def _wait_for_line(launch: Launch, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in launch.text():
        assert launch.proc.poll() is None, f"run ended (rc {launch.proc.returncode}) before {text!r}:\n" \
                                           f"{launch.text()[-4000:]}"
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s"
        time.sleep(0.02)


def _committed(run) -> list[int]:
    """Steps of the checkpoint events in metrics.jsonl: logged when a checkpoint counts."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in events if e.get("event") == "checkpoint"]


@TRAIN_RUNS
def test_sigkill_of_one_rank_during_an_async_save_loses_nothing(runs_root, ising_shards):
    from pipeline.train.checkpoint import CheckpointError, validate

    run = runs_root / "async-killed"
    _start_reference("vdm", runs_root, ising_shards)  # the synchronous run, beside this one (cached)
    # 1. Each rank's background write held back DELAY_S (test hook), so that a checkpoint is
    # surely in flight: the one of step EVERY is committed once its writes are done (at the
    # latest before the next save), then rank 1 is SIGKILLed as soon as the one of step
    # 2*EVERY is staged, well within its DELAY_S.
    env = {**conftest.subprocess_env(), "PIPELINE_CHECKPOINT_WRITE_DELAY_S": str(DELAY_S)}
    launch = Launch(train_args(run, ising_shards, "vdm", ASYNC), runs_root / "async-1.log", env=env)
    workers = launch.workers(2)
    _wait_for_line(launch, f"checkpoint: step {2 * EVERY} staged, writing in the background")
    workers[1].send_signal(signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
    assert _committed(run) == [EVERY]  # the first one was committed, after its step
    ckpts = run / "checkpoints"
    assert latest(run) == f"step-{EVERY:08d}"  # the previous checkpoint still counts ...
    assert validate(ckpts / f"step-{EVERY:08d}")["step"] == EVERY  # ... intact
    assert not (ckpts / f"step-{2 * EVERY:08d}").exists()  # the one in flight never counted
    partial = ckpts / f".partial-step-{2 * EVERY:08d}"
    with pytest.raises(CheckpointError, match="no manifest.json"):
        validate(partial)
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["latest", f"step-{EVERY:08d}"]

    # 2. Restarted (no hold-back): resumes from the previous checkpoint and finishes, bitwise
    # equal to the uninterrupted synchronous run (model, Adam moments, EMA, export).
    restart = Launch(train_args(run, ising_shards, "vdm", ASYNC), runs_root / "async-2.log").check()
    assert f"resumed from step {EVERY} " in restart
    assert f"removing .partial-step-{2 * EVERY:08d}" in restart
    assert latest(run) == f"step-{NUM_STEPS:08d}"
    ref = reference_run("vdm", runs_root, ising_shards)
    assert_bitwise_equal(final_state(ref), final_state(run))
    # Every step's metrics as the synchronous run logged them (the steps the killed run logged
    # after step EVERY were trained again; metrics.jsonl keeps the restart's).
    assert logged_steps(run) == list(range(1, NUM_STEPS + 1))
    a, b = metric_rows(ref), metric_rows(run)
    for step in range(1, NUM_STEPS + 1):
        keep = [k for k in a[step] if k.startswith(("vdm/", "train/")) and not k.endswith("_s")]  # not timings
        assert {k: a[step][k] for k in keep} == {k: b[step][k] for k in keep}, step
    # Checkpoints were committed after their step (by a later step's poll or at the end) and
    # logged once each, in order.
    assert _committed(run)[-2:] == [2 * EVERY, NUM_STEPS]
