"""Bitwise kill-and-resume of the real `pipeline train` (VDM and GAN, DDP, 2 CPU processes).

For each objective: an uninterrupted run of NUM_STEPS steps, and a run in the same
configuration whose rank 1 is SIGKILLed between two checkpoints and which is then restarted
with the same run.dir. The restarted run must end with every parameter, Adam moment, EMA
weight and the export bitwise equal to the uninterrupted run's.

This module also holds the launch helpers and the cached runs that test_faults.py,
test_backends_real.py and test_multinode.py reuse, so each launch happens once per session.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from tests import conftest
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

NUM_STEPS = 30
EVERY = 10  # train.checkpoint_every_steps
COMMON = ["--config", "configs/quickstart.yaml", f"train.num_steps={NUM_STEPS}",
          f"train.checkpoint_every_steps={EVERY}", "train.log_every_steps=1", "train.warmup_steps=0",
          "data.batch_per_rank=8", "data.num_workers=0", "track.wandb=off", "track.progress_bar=false",
          "train.num_sample_images=16", "engine.timeout_s=20"]
OBJECTIVES = {
    "vdm": ["objective=vdm", "vdm.num_timesteps=10", "vdm.channels=8"],
    "gan": ["objective=gan", "gan.loss=non-saturating", "gan.channels=[8,16]", "gan.latent_dim=8"],
}


# quickstart.yaml sets train.lr and the vdm section, which a GAN does not read (refused).
BASE_CONFIG = {"vdm": "configs/quickstart.yaml", "gan": "tests/integration/gan_quickstart.yaml"}


def train_args(run: Path, shards: Path, objective: str, *extra: str) -> list[str]:
    common = [BASE_CONFIG[objective] if a == "configs/quickstart.yaml" else a for a in COMMON]
    return ["train", *common, *OBJECTIVES[objective], f"run.dir={run}", f"data.train_urls={shards}", *extra]


# --------------------------------------------------------------------------- launching


class Launch:
    """One real `accelerate launch --multi_gpu` (gloo on CPU) in the background, output to a log."""

    def __init__(self, args: list[str], log: Path, *, num_processes: int = 2, num_machines: int = 1,
                 machine_rank: int = 0, port: int | None = None, env: dict | None = None):
        self.log = Path(log)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", str(num_machines),
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
        if num_machines > 1:
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
        cmd += ["-m", "pipeline", *args]
        self.cmd = cmd
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env or conftest.subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
        self._workers: dict[int, psutil.Process] = {}

    def workers(self, expected: int, timeout: float = 120) -> dict[int, psutil.Process]:
        """The training processes (the launcher's children with RANK set), by global rank."""
        deadline = time.monotonic() + timeout
        while len(self._workers) < expected:
            assert self.proc.poll() is None, f"launcher exited {self.proc.returncode}:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, "worker processes did not appear"
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    env = child.environ()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if "RANK" in env and "-m" in child.cmdline():
                    self._workers[int(env["RANK"])] = child
            time.sleep(0.05)
        return self._workers

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launch did not finish within {timeout} s:\n{self.text()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL what this launch started (by pid), e.g. after a deliberately hung rank."""
        for w in self._workers.values():
            try:
                w.send_signal(signal.SIGCONT)
                w.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self, timeout: float = 300) -> str:
        rc = self.wait(timeout)
        if rc != 0:
            raise AssertionError(f"{' '.join(self.cmd)} exited {rc}:\n{self.text()[-6000:]}")
        return self.text()


def logged_steps(run: Path) -> list[int]:
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "event" not in row:
            out.append(int(row["step"]))
    return out


def metric_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "event" not in r}


def wait_for_step(launch: Launch, run: Path, step: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while True:
        last = max(logged_steps(run), default=-1)
        if last >= step:
            return last
        assert launch.proc.poll() is None, f"run ended (rc {launch.proc.returncode}) before step {step}:\n" \
                                           f"{launch.text()[-4000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached within {timeout} s"
        time.sleep(0.02)


def latest(run: Path) -> str:
    return (Path(run) / "checkpoints" / "latest").read_text().strip()


# --------------------------------------------------------------------------- final state


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def final_state(run: Path) -> dict[str, object]:
    """Every tensor and number of the newest checkpoint's model, optimizer, EMA and trainer
    files plus the export, flattened to {path: value}. RNG and stream state are left out:
    they are compared through their effect (the next steps), not as bytes."""
    from safetensors.torch import load_file

    ckpt = Path(run) / "checkpoints" / latest(run)
    out: dict[str, object] = {}
    files = sorted(p for p in ckpt.glob("*.pt") if p.name.split("-")[0] in ("ema", "trainer"))
    phases = sorted(p.name.split("-", 1)[1] for p in ckpt.glob("ddp-*"))
    assert phases, f"no model files in {ckpt}"
    for p in files:
        for k, v in _flatten(torch.load(p, map_location="cpu", weights_only=True)):
            out[f"{p.name}{k}"] = v
    for phase in phases:
        for k, v in _flatten(phase_state(ckpt, phase)):
            out[f"{phase}{k}"] = v
        for k, v in _flatten(torch.load(ckpt / f"ddp-{phase}" / "scheduler.pt", weights_only=True)):
            out[f"{phase}/scheduler{k}"] = v
    for k, v in load_file(str(Path(run) / "export" / "weights.safetensors")).items():
        out[f"export/{k}"] = v
    return out


def phase_state(ckpt: Path, phase: str) -> dict:
    """One phase's model and optimizer state in a checkpoint, ``{"model": ..., "optim": ...}``
    as whole tensors (its DCP directory, ``ddp-<phase>`` or ``fsdp-<phase>``, read without a
    process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    d = next(p for p in (Path(ckpt) / f"ddp-{phase}", Path(ckpt) / f"fsdp-{phase}") if p.is_dir())
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(d, Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = []
    for k in a:
        x, y = a[k], b[k]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            diff = float((x.double() - y.double()).abs().max()) if isinstance(x, torch.Tensor) else (x, y)
            differ.append(f"{k}: {diff}")
    assert not differ, f"{len(differ)} of {len(a)} entries differ, e.g.\n" + "\n".join(differ[:8])


# --------------------------------------------------------------------------- cached runs


@dataclass
class KilledRun:
    run: Path
    step_at_kill: int  # last step in metrics.jsonl when rank 1 was killed
    latest_at_kill: str  # newest complete checkpoint then
    exit_code: int  # of the launcher
    seconds_to_exit: float  # from SIGKILL of rank 1 to the launcher's exit
    log: str
    restart_log: str


_CACHE: dict[str, dict] = {}


def _start_reference(objective: str, root: Path, shards: Path) -> dict:
    key = f"ref-{objective}"
    if key not in _CACHE:
        run = root / f"ref-{objective}"
        _CACHE[key] = {"run": run, "launch": Launch(train_args(run, shards, objective), root / f"ref-{objective}.log")}
    return _CACHE[key]


def reference_run(objective: str, root: Path, shards: Path) -> Path:
    """The uninterrupted run (started in the background by killed_run, to share the 2 cores'
    idle launch time)."""
    ref = _start_reference(objective, root, shards)
    if "log" not in ref:
        ref["log"] = ref["launch"].check()
    return ref["run"]


def killed_run(objective: str, root: Path, shards: Path) -> KilledRun:
    """Rank 1 SIGKILLed between the checkpoints at EVERY and 2*EVERY, then a restart."""
    key = f"killed-{objective}"
    if key not in _CACHE:
        run = root / f"killed-{objective}"
        _start_reference(objective, root, shards)
        launch = Launch(train_args(run, shards, objective), root / f"killed-{objective}.log")
        workers = launch.workers(2)
        wait_for_step(launch, run, EVERY + 1)  # the checkpoint at EVERY is complete before step EVERY+1 runs
        # Freeze both ranks so the state at the kill is known, then kill rank 1 and let rank 0
        # run on into its next collective with a dead peer.
        for w in workers.values():
            w.send_signal(signal.SIGSTOP)
        step_at_kill, latest_at_kill = max(logged_steps(run)), latest(run)
        workers[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        workers[0].send_signal(signal.SIGCONT)
        rc = launch.wait(timeout=300)
        seconds = time.monotonic() - t0
        restart = Launch(train_args(run, shards, objective), root / f"killed-{objective}-restart.log")
        _CACHE[key] = {"info": KilledRun(run, step_at_kill, latest_at_kill, rc, seconds, launch.text(),
                                         restart.check())}
    return _CACHE[key]["info"]


# The killed and reference runs are cached per process (_CACHE, under the session's runs_root):
# every test that uses them runs on one xdist worker, so each is trained once, not once per worker.
TRAIN_RUNS = pytest.mark.xdist_group("train_runs")


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-runs")


# --------------------------------------------------------------------------- tests


@TRAIN_RUNS
@pytest.mark.parametrize("objective", ["vdm", "gan"])
def test_sigkill_one_rank_then_resume_is_bitwise_equal_to_uninterrupted(objective, runs_root, ising_shards):
    killed = killed_run(objective, runs_root, ising_shards)  # starts the reference beside it
    ref = reference_run(objective, runs_root, ising_shards)
    # The kill really fell between two checkpoints, mid-training.
    assert killed.latest_at_kill == f"step-{EVERY:08d}", killed.latest_at_kill
    assert EVERY < killed.step_at_kill < 2 * EVERY
    assert killed.exit_code != 0
    assert f"resumed from step {EVERY} " in killed.restart_log
    assert latest(killed.run) == latest(ref) == f"step-{NUM_STEPS:08d}"
    # The restart logs only the steps it trained; steps the killed run logged after the
    # checkpoint are not logged twice.
    assert logged_steps(killed.run) == list(range(1, NUM_STEPS + 1))
    a, b = final_state(ref), final_state(killed.run)
    assert len(a) > 10
    assert_bitwise_equal(a, b)
