"""Real SLURM: a 2-node job, slurm/train.sbatch on 2 nodes, preemption -> requeue -> resume, and
`scancel` (SIGTERM to every process of the job) -> checkpoint, exit 75 -> resume in a new job.

Needs a running cluster with at least 2 nodes (locally: `bash .ci/slurm-up.sh` as root,
which .ci/run calls). Without `sinfo` these tests skip, except under CI (CI=true), where a
missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import REPO

# One cluster of 2 nodes: under pytest-xdist its tests run on one worker, one job at a time
# (two workers submitting at once would queue each other's jobs past their timeouts).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TINY = ["train.log_every_steps=1", "train.warmup_steps=0", "vdm.num_timesteps=10", "vdm.channels=8",
        "data.batch_per_rank=16", "data.num_workers=0", "track.wandb=offline", "track.progress_bar=false",
        "train.num_sample_images=16"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but SLURM is not installed (sinfo not found): .ci/slurm-up.sh should have set it up")
        pytest.skip("no SLURM here (sinfo not found); start the local 2-node cluster with `bash .ci/slurm-up.sh` (root)")
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sinfo failed: {r.stderr}"
    usable = {line.split()[0] for line in r.stdout.splitlines() if re.match(r"\S+ (idle|mixed|allocated|completing)", line)}
    assert len(usable) >= 2, f"need 2 usable SLURM nodes, sinfo says:\n{r.stdout}"


def _env() -> dict[str, str]:
    # Both test "nodes" are this one host: on a machine with a GPU they would share it, so
    # the training runs on CPU, one process per node.
    return conftest.subprocess_env(PIPELINE_PYTHON=sys.executable, PIPELINE_CHECKPOINT_WAIT_S="60",
                             PIPELINE_PROCS_PER_NODE="1", CUDA_VISIBLE_DEVICES="")


def _submit(*args: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=_env())  # fmt: skip
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job_id}: {r.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _wait(job_id: str, timeout_s: float, log: Path | None = None) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _job(job_id)
        if info["JobState"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            tail = log.read_text()[-5000:] if log is not None and log.exists() else ""
            pytest.fail(f"job {job_id} not finished after {timeout_s}s (state {info['JobState']}):\n{tail}")
        time.sleep(1)


def _steps(run_dir: Path) -> list[int]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [d["step"] for d in lines if "event" not in d]


def test_two_node_job_runs_on_both_nodes(cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks-per-node=1 bash -c 'echo \"node=$SLURMD_NODENAME rank=$SLURM_PROCID\"'\n")
    out = tmp_path / "hello.out"
    r = subprocess.run(["sbatch", "--wait", "--nodes=2", "--time=5", f"--output={out}", str(script)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("node="))
    assert len(lines) == 2, out.read_text()
    assert {line.split()[1] for line in lines} == {"rank=0", "rank=1"}
    assert len({line.split()[0] for line in lines}) == 2  # two distinct nodes


def test_train_sbatch_on_two_nodes(cluster, tmp_path, ising_shards):
    run = tmp_path / "run dir"  # a space: quoting is exercised on the real path too
    job = _submit("--nodes=2", "--time=15", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                  "configs/quickstart.yaml", "train.num_steps=6", "train.checkpoint_every_steps=3",
                  f"run.dir={run}", f"data.train_urls={ising_shards}", *TINY)  # fmt: skip
    log = tmp_path / f"pipeline-train-{job}.out"
    info = _wait(job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]

    for step in (3, 6):
        manifest = json.loads((run / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())
        assert manifest["step"] == step and manifest["world_size"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert text.count("2 in all") == 2  # one launcher per node, 2 processes in total
    assert _steps(run) == [1, 2, 3, 4, 5, 6]

    record = json.loads((run / f"slurm-{job}.json").read_text())
    assert record["job_id"] == job and len(record["starts"]) == 1
    assert len(set(record["starts"][0]["hosts"])) == 2
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["track"]["run_id"] == f"slurm-{job}"  # a requeued job continues this W&B run


def _wait_for_step(run, job: str, log, step: int, timeout_s: float = 300) -> None:
    """Until the job's training has logged ``step`` (failing if the job ends first)."""
    deadline = time.monotonic() + timeout_s
    while not ((run / "metrics.jsonl").exists() and any(s >= step for s in _steps(run))):
        state = _job(job)["JobState"]
        assert state not in TERMINAL, f"job ended ({state}) before training started:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"training did not start:\n{log.read_text()[-5000:] if log.exists() else ''}"
        time.sleep(0.5)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path, ising_shards):
    run = tmp_path / "run"
    num_steps = 250
    job = _submit("--nodes=2", "--time=20", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                  "configs/quickstart.yaml", f"train.num_steps={num_steps}", "train.checkpoint_every_steps=1000",
                  f"run.dir={run}", f"data.train_urls={ising_shards}", *TINY)  # fmt: skip
    log = tmp_path / f"pipeline-train-{job}.out"
    try:
        _wait_for_step(run, job, log, step=5)
        # What SLURM sends before a time limit (--signal=B:USR1@...) or what an admin sends.
        r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        info = _wait(job, 600, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Restarts"] == "1", text[-5000:]

    preempted = re.findall(r"preempted: checkpoint at step (\d+)", text)
    resumed = re.findall(r"resumed from step (\d+)", text)
    assert len(preempted) == 1 and resumed[:1] == preempted, text[-5000:]
    k = int(preempted[0])
    assert 5 <= k < num_steps
    assert (run / "checkpoints" / f"step-{k:08d}" / "manifest.json").is_file()
    assert "requeueing job" in text
    # Every step exactly once across both starts: the second start continued at k + 1.
    assert _steps(run) == list(range(1, num_steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{num_steps:08d}"
    starts = json.loads((run / f"slurm-{job}.json").read_text())["starts"]
    assert [s["restart_count"] for s in starts] == [0, 1]


def test_scancel_checkpoints_on_every_rank_and_the_job_resumes(cluster, tmp_path, ising_shards):
    """`scancel` (as the time limit) SIGTERMs every process of the job, DataLoader workers
    included: both ranks checkpoint at the step that was running, the batch script exits 75
    and does not requeue, and a new job with the same run.dir resumes from that checkpoint."""
    from pipeline.train.checkpoint import validate
    from pipeline.run_dir import RunDir

    run = tmp_path / "run"
    common = ["configs/quickstart.yaml", "train.checkpoint_every_steps=1000", f"run.dir={run}",
              f"data.train_urls={ising_shards}", *TINY, "data.num_workers=1"]  # fmt: skip
    job = _submit("--nodes=2", "--time=20", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch", *common,
                  "train.num_steps=3000")  # fmt: skip
    log = tmp_path / f"pipeline-train-{job}.out"
    try:
        _wait_for_step(run, job, log, step=5)
        r = subprocess.run(["scancel", job], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        info = _wait(job, 300, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    # SLURM records the batch script's exit code, 75, even for a cancelled job.
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("CANCELLED", "75:0", "0"), text[-5000:]
    assert "killed by signal" not in text, text[-5000:]
    preempted = re.findall(r"preempted: checkpoint at step (\d+)", text)
    assert len(preempted) == 1, text[-5000:]
    k = int(preempted[0])
    assert 5 <= k < 3000 and max(_steps(run)) == k
    manifest = validate(run / "checkpoints" / f"step-{k:08d}")
    assert manifest["step"] == k and manifest["world_size"] == 2
    assert json.loads(RunDir(run).preempted.read_text())["step"] == k
    assert "preemption checkpoint written" in text and "exiting 75" in text, text[-5000:]
    assert "requeueing job" not in text, text[-5000:]  # scancel stops the job

    again = _submit("--nodes=2", "--time=15", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch", *common,
                    f"train.num_steps={k + 3}")  # fmt: skip
    log2 = tmp_path / f"pipeline-train-{again}.out"
    info = _wait(again, 300, log2)
    text2 = log2.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text2[-5000:]
    assert f"resumed from step {k} " in text2, text2[-5000:]
    assert _steps(run) == list(range(1, k + 4))  # every step once across both jobs
