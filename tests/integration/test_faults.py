"""Faults of the real training loop on 2 CPU processes (gloo): a dead rank, a hung rank,
NaN/Inf data, and preemption signals (SIGUSR1 / SIGTERM, exit code 75, resume)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_pipeline
from tests.integration.test_exact_resume import (
    NUM_STEPS, Launch, assert_bitwise_equal, final_state, killed_run, latest, logged_steps, metric_rows,
    TRAIN_RUNS, phase_state, reference_run, runs_root, train_args, wait_for_step,
)
from tests.integration.test_multinode import HANG_TIMEOUT_S, two_node_run

pytestmark = pytest.mark.integration
__all__ = ["runs_root"]  # the shared fixture, re-exported for this module

TIMEOUT_S = 20  # engine.timeout_s of the shared runs (test_exact_resume.COMMON)


@TRAIN_RUNS
def test_dead_rank_stops_survivor_and_launcher_quickly(runs_root, ising_shards):
    killed = killed_run("vdm", runs_root, ising_shards)
    # Measured: about 1 s (gloo sees the peer's socket close; the elastic agent tears down).
    assert killed.seconds_to_exit < TIMEOUT_S, killed.seconds_to_exit
    assert killed.exit_code != 0
    assert "SIGKILL" in killed.log  # the launcher names the dead rank's signal


def test_hung_rank_on_another_node_times_out_within_engine_timeout(tmp_path_factory, ising_shards):
    """A rank that stops responding (SIGSTOP: alive, sockets open) on the other node: only the
    collective timeout (engine.timeout_s) can free the surviving node, not gloo's 30 min default."""
    hung = two_node_run(tmp_path_factory.mktemp("multinode"), ising_shards)
    assert hung.node0_exit_code != 0
    # It is the configured timeout that fired: not much earlier, not much later.
    assert 0.8 * HANG_TIMEOUT_S <= hung.seconds_to_exit <= HANG_TIMEOUT_S + 30, hung.seconds_to_exit
    assert re.search(rf"Timed out waiting {HANG_TIMEOUT_S * 1000}ms", hung.node0_log), hung.node0_log[-3000:]


# ------------------------------------------------------------------------------ NaN / Inf


def _batches_holding(shards: Path, cfg_args: list[str], world_size: int, num_batches: int) -> dict:
    """{(rank, batch index): [sample rows]} as the training stream serves them."""
    from pipeline.config import load_config
    from pipeline.data.stream import build_stream

    cfg = load_config("configs/quickstart.yaml", [a for a in cfg_args if "=" in a])
    out = {}
    for rank in range(world_size):
        s = build_stream(cfg.data, rank=rank, world_size=world_size, seed=cfg.run.seed)
        try:
            for b in range(num_batches):
                out[rank, b] = next(s)["x"]
        finally:
            s.close()
    return out


def test_nan_and_inf_steps_are_skipped_together_then_the_run_stops(tmp_path):
    max_bad = 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 1, 8, 8)).astype(np.float32)  # every sample distinct
    np.save(tmp_path / "x.npy", x)

    def write(name: str) -> Path:
        out = tmp_path / name
        run_pipeline("shards", "npy", "--x", str(tmp_path / "x.npy"), "--data-kind", "continuous",
                     "--out", str(out), "--val-fraction", "0", "--samples-per-shard", "128")
        return out

    clean = write("clean")
    run = tmp_path / "run"
    extra = ["vdm.data_kind=auto", "train.checkpoint_every_steps=5", f"train.max_bad_steps={max_bad}", "train.num_steps=20"]
    args = train_args(run, clean, "vdm", *extra)
    # Which samples each rank trains on at each step: poison one of rank 0's at step 3 (NaN)
    # and one of rank 1's at steps 7, 8, 9 (NaN, +Inf, NaN).
    index = {x[i].tobytes(): i for i in range(len(x))}
    served = _batches_holding(clean, args, 2, 10)
    for (rank, b), pixel, value in [((0, 2), 5, np.nan), ((1, 6), 0, np.nan), ((1, 7), 63, np.inf),
                                    ((1, 8), 17, np.nan)]:
        i = index[served[rank, b][0].numpy().tobytes()]
        x[i].reshape(-1)[pixel] = value
    np.save(tmp_path / "x.npy", x)
    bad = write("bad")
    args = train_args(run, bad, "vdm", *extra)

    # Reference: the steps whose batch holds a non-finite value on some rank, read back
    # through the stream from the poisoned shards.
    served = _batches_holding(bad, args, 2, 10)
    bad_steps = sorted({b + 1 for (r, b), xb in served.items() if not torch.isfinite(xb).all()})
    assert bad_steps == [3, 7, 8, 9]

    launch = Launch(args, tmp_path / "train.log")
    rc = launch.wait()
    log = launch.text()
    assert rc != 0
    assert f"{max_bad} consecutive steps with NaN/Inf loss or gradients (train.max_bad_steps={max_bad})" in log
    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, 9))  # step 9 is the third bad one in a row: no step 9
    for step, row in rows.items():
        # skipped is averaged over ranks: 1.0 means both ranks skipped (a collective decision).
        assert row["vdm/skipped"] == (1.0 if step in bad_steps else 0.0), (step, row["vdm/skipped"])
        assert row["train/bad_steps"] == sum(s <= step for s in bad_steps), step
        # metrics.jsonl is strict JSON: a non-finite loss is written as null.
        assert (row["vdm/bits_per_dim"] is None) == (step in bad_steps), (step, row["vdm/bits_per_dim"])
    # The last good checkpoint (step 5, one skipped step in it) is intact and is the latest.
    from pipeline.train.checkpoint import validate

    assert latest(run) == "step-00000005"
    manifest = validate(run / "checkpoints" / "step-00000005")
    assert manifest["step"] == 5 and manifest["world_size"] == 2
    trainer = torch.load(run / "checkpoints" / "step-00000005" / "trainer.pt", weights_only=True)
    assert trainer["bad_steps"] == 1 and trainer["consecutive_bad_steps"] == 0
    model = phase_state(run / "checkpoints" / "step-00000005", "vdm")["model"]
    assert all(torch.isfinite(v).all() for v in model.values())
    assert not list((run / "checkpoints").glob(".partial-*"))


# ------------------------------------------------------------------------------ signals


def _exit_codes(log: str) -> list[int]:
    """Worker exit codes from the elastic launcher's failure summary."""
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]


@TRAIN_RUNS
def test_signals_checkpoint_exit_75_and_resume_exactly(runs_root, ising_shards, tmp_path):
    """SIGUSR1 to the workers (as `srun`/`scancel --signal` delivers it), then SIGTERM to the
    launcher (forwarded to the workers): each time a checkpoint at the current step and exit
    75; the third start finishes, bitwise equal to the uninterrupted run."""
    run = tmp_path / "run"
    args = train_args(run, ising_shards, "vdm")

    first = Launch(args, tmp_path / "usr1.log")
    workers = first.workers(2)
    wait_for_step(first, run, 3)
    for w in workers.values():
        w.send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    first.wait(timeout=60)
    seconds_usr1 = time.monotonic() - t0
    m = re.search(r"preempted: checkpoint at step (\d+); exiting 75", first.text())
    assert m, first.text()[-3000:]
    step1 = int(m.group(1))
    assert 3 <= step1 < NUM_STEPS and latest(run) == f"step-{step1:08d}"
    codes = _exit_codes(first.text())  # the summary lists every failed rank (and the first again)
    assert codes and set(codes) == {75}, codes
    assert re.search(r"rank\s*:\s*0 ", first.text()) and re.search(r"rank\s*:\s*1 ", first.text())
    assert seconds_usr1 < 30, seconds_usr1  # well within a SLURM --signal grace period

    second = Launch(args, tmp_path / "term.log")
    second.workers(2)
    wait_for_step(second, run, step1 + 3)
    second.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = second.wait(timeout=60)
    seconds_term = time.monotonic() - t0
    text = second.text()
    assert f"resumed from step {step1} " in text
    m = re.search(r"preempted: checkpoint at step (\d+); exiting 75", text)
    assert m, text[-3000:]
    step2 = int(m.group(1))
    assert step2 > step1 and latest(run) == f"step-{step2:08d}"
    # The launcher itself does not pass 75 on: torch's elastic agent turns SIGTERM into an
    # exception, and `accelerate launch` exits 128 + 15. A requeue script must look at what
    # the ranks wrote (run.dir/preempted.json, as launch/requeue_exit.sh does), not at it.
    assert rc == 128 + signal.SIGTERM, rc
    assert seconds_term < 30, seconds_term  # before the agent's SIGKILL grace period ends

    third = Launch(args, tmp_path / "final.log")
    assert f"resumed from step {step2} " in third.check()
    assert logged_steps(run) == list(range(1, NUM_STEPS + 1))
    assert_bitwise_equal(final_state(reference_run("vdm", runs_root, ising_shards)), final_state(run))


_SLOW_EXIT = '''
import sys, time
from pipeline.train.loop import PreemptionFlag

class SlowShutdown:
    def __del__(self, _sleep=time.sleep):  # runs while Python finalises, like gloo/W&B teardown
        print("finalising", flush=True)
        _sleep(3)

flag = PreemptionFlag()
if sys.argv[1] == "acted-on":
    flag.ignore_further()  # what the loop does after the preemption checkpoint
slow = SlowShutdown()
sys.exit(75)
'''


@pytest.mark.parametrize("acted_on", [True, False])
def test_a_rank_exiting_75_survives_the_launchers_sigterm(acted_on, tmp_path):
    """When one rank exits 75 the elastic agent SIGTERMs the others, maybe while they are
    already finalising (Python has then reset handled signals to their default action). The
    loop's ignore_further() keeps their exit code 75; the control shows the race is real."""
    import subprocess
    import sys

    script = tmp_path / "slow_exit.py"
    script.write_text(_SLOW_EXIT)
    p = subprocess.Popen([sys.executable, str(script), "acted-on" if acted_on else "control"], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("finalising"):
            time.sleep(0.2)
            p.send_signal(signal.SIGTERM)
            break
    assert p.wait(timeout=30) == (75 if acted_on else -signal.SIGTERM)
