"""SIGTERM to the whole process group, as SLURM (`scancel`, time limit), `timeout` and
Kubernetes send it: launcher, ranks and DataLoader workers (data.num_workers > 0) all get it.

Every run must end in a checkpoint at the step that was running, exit 75 (directly for a
plain `pipeline train`; through launch/requeue_exit.sh for `accelerate launch`, whose elastic
agent exits 143), and resume from it. The SIGTERM test in test_faults.py signals the launcher
only, and runs without DataLoader workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import REPO, free_port
from tests.integration.test_exact_resume import latest, logged_steps, train_args

pytestmark = pytest.mark.integration

NUM_STEPS = 400  # long enough that the signal lands mid-run; the resumes are shorter
EXTRA = ["data.num_workers=1", "train.checkpoint_every_steps=1000"]  # only the preemption checkpoint


class GroupRun:
    """A command in its own session (process group), output to a log, signalled as a group."""

    def __init__(self, cmd: list[str], log: Path):
        self.cmd, self.log = cmd, log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=conftest.subprocess_env(), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_step(self, run: Path, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while max(logged_steps(run), default=-1) < step:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before step {step}:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"step {step} not reached within {timeout} s"
            time.sleep(0.02)

    def terminate_group(self, run: Path, timeout: float = 90) -> tuple[int, int, float]:
        """`kill -TERM -- -PGID`; returns (exit code, last step logged just after the signal, seconds)."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        logged_at_signal = max(logged_steps(run))
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"not finished {timeout} s after SIGTERM:\n{self.text()[-4000:]}") from None
        return rc, logged_at_signal, time.monotonic() - t0


def _accelerate(num_processes: int, args: list[str]) -> list[str]:
    """The command line of conftest.accelerate_launch."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "pipeline", *args]


def _assert_preempted_at(run: Path, logged_at_signal: int, log: str, world_size: int) -> int:
    """The checkpoint of the step that was running when the signal came, complete; returns it."""
    from pipeline.train.checkpoint import validate
    from pipeline.run_dir import RunDir

    assert "killed by signal" not in log, log[-4000:]  # no DataLoader worker died of it
    marker = json.loads(RunDir(run).preempted.read_text())
    k = marker["step"]
    assert marker == {"step": k, "checkpoint": f"step-{k:08d}", "exit_code": 75}
    assert f"preempted: checkpoint at step {k}; exiting 75" in log
    # The step running at the signal finished (its row may have been written just after the
    # signal), and none after it started: the checkpoint is at the signalled step.
    assert logged_at_signal in (k - 1, k), (logged_at_signal, k)
    assert max(logged_steps(run)) == k and k < NUM_STEPS
    assert latest(run) == f"step-{k:08d}"
    manifest = validate(run / "checkpoints" / f"step-{k:08d}")
    assert manifest["step"] == k and manifest["world_size"] == world_size
    return k


def _assert_resumes(run: Path, k: int, log: str, num_steps: int) -> None:
    assert f"resumed from step {k} " in log, log[-4000:]
    assert logged_steps(run) == list(range(1, num_steps + 1))  # every step once, across both runs


def test_plain_run_checkpoints_on_group_sigterm_exits_75_and_resumes(ising_shards, tmp_path):
    run = tmp_path / "run"
    args = train_args(run, ising_shards, "vdm", f"train.num_steps={NUM_STEPS}", *EXTRA)
    first = GroupRun([sys.executable, "-m", "pipeline", *args], tmp_path / "first.log")
    first.wait_for_step(run, 3)
    rc, logged_at_signal, seconds = first.terminate_group(run)
    assert rc == 75, first.text()[-4000:]
    assert seconds < 30, seconds
    k = _assert_preempted_at(run, logged_at_signal, first.text(), world_size=1)

    resumed = conftest.run_pipeline(*train_args(run, ising_shards, "vdm", f"train.num_steps={k + 3}", *EXTRA))
    _assert_resumes(run, k, resumed.stdout + resumed.stderr, k + 3)


def test_accelerate_launch_checkpoints_on_group_sigterm_and_the_wrapper_exits_75(ising_shards, tmp_path):
    run = tmp_path / "run"
    args = train_args(run, ising_shards, "vdm", f"train.num_steps={NUM_STEPS}", "data.num_workers=2",
                      "train.checkpoint_every_steps=1000")
    wrapper = str(REPO / "launch" / "requeue_exit.sh")
    first = GroupRun([wrapper, str(run), *_accelerate(2, args)], tmp_path / "first.log")
    first.wait_for_step(run, 3)
    rc, logged_at_signal, seconds = first.terminate_group(run)
    text = first.text()
    assert rc == 75, text[-4000:]
    # What the launcher itself returned: the elastic agent exits 128 + SIGTERM.
    assert "exited 143 after the preemption checkpoint" in text, text[-4000:]
    assert "Received 15 death signal" in text  # the agent got the group's SIGTERM too
    assert "forcefully exiting via SIGKILL" not in text  # the ranks ended within its shutdown timeout
    assert seconds < 30, seconds
    k = _assert_preempted_at(run, logged_at_signal, text, world_size=2)

    resumed = conftest.accelerate_launch(2, *train_args(run, ising_shards, "vdm", f"train.num_steps={k + 3}",
                                                        "data.num_workers=2", "train.checkpoint_every_steps=1000"))
    _assert_resumes(run, k, resumed.stdout + resumed.stderr, k + 3)


def test_the_wrapper_passes_other_exit_codes_on_and_ignores_a_stale_marker(tmp_path):
    """A run that did not write the marker keeps its own exit code, even when an old one is there."""
    from pipeline.run_dir import RunDir

    RunDir(tmp_path).preempted.write_text("{}")  # left by an earlier preempted start
    r = subprocess.run([str(REPO / "launch" / "requeue_exit.sh"), str(tmp_path), "bash", "-c", "exit 3"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    r = subprocess.run([str(REPO / "launch" / "requeue_exit.sh"), str(tmp_path), "bash", "-c",
                        f"echo '{{}}' > {RunDir(tmp_path).preempted}; kill -TERM $$"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 75, r.stderr
