"""slurm/train.sbatch run outside SLURM, with fake `srun`, `scontrol` and `accelerate launch`.

Checks the argv every node's launcher receives (defaults for run.dir and track.run_id,
hostile override values intact), the record written to the run directory, and the
preemption protocol: SIGUSR1 -> forwarded to the step, checkpoint, `scontrol requeue`;
SIGTERM -> wait, no requeue. The real cluster: tests/integration/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.unit.test_launch_node import REPO, _node_env, _write_exe

SBATCH = REPO / "slurm" / "train.sbatch"


def _sbatch_env(tmp: Path, fake_srun: str, **extra: str) -> dict[str, str]:
    _write_exe(
        tmp / "scontrol",
        """
        #!/bin/sh
        echo "$*" >> "$FAKE_OUT/scontrol.log"
        case "$1 $2" in
          "show hostnames") printf 'node-a\\nnode-b\\n' ;;
          "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=addr-of-$3 NodeHostName=$3 State=IDLE" ;;
        esac
        """,
    )
    _write_exe(tmp / "srun", fake_srun)
    submit = tmp / "submit dir"
    submit.mkdir(exist_ok=True)
    env = _node_env(
        tmp,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="pipeline-train",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(submit),
        PIPELINE_ROOT=str(REPO),
        PIPELINE_CHECKPOINT_WAIT_S="20",
    )
    env.pop("SLURM_NODEID")
    env.update(extra)
    return env


# Runs the command after srun's options once per node, as srun would (in sequence here).
_SRUN_PER_NODE = """
    #!/bin/bash
    printf '%s\\0' "$@" > "$FAKE_OUT/srun.argv"
    while [ "${1#--}" != "$1" ]; do shift; done
    for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@" || exit $?; done
    """


def _config(tmp: Path, text: str = "data:\n  train_urls: shards\ntrain:\n  num_steps: 5\n") -> Path:
    cfg = tmp / "my config.yaml"
    cfg.write_text(text)
    return cfg


def test_sbatch_defaults_run_dir_and_passes_overrides_intact(tmp_path):
    env = _sbatch_env(tmp_path, _SRUN_PER_NODE)
    cfg = _config(tmp_path)
    pwned = tmp_path / "pwned"
    hostile = [f"track.group=x; touch {pwned}", f"run.name=$(touch {pwned})"]
    proc = subprocess.run(["bash", str(SBATCH), str(cfg), *hostile], cwd=env["SLURM_SUBMIT_DIR"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not pwned.exists()
    expected_tail = ["--config", str(cfg), "run.dir=runs/slurm-4242", "track.run_id=slurm-4242", *hostile]
    for node_id in (0, 1):
        argv = json.loads((tmp_path / f"launch-{node_id}.json").read_text())["argv"]
        assert argv[argv.index("--config") :] == expected_tail
        assert argv[argv.index("--main_process_ip") + 1] == "addr-of-node-a"
        assert argv[argv.index("--main_process_port") + 1] == str(20000 + 4242 % 20000)
        assert argv[argv.index("--machine_rank") + 1] == str(node_id)
        assert argv[argv.index("--num_processes") + 1] == "2"
    srun_argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert "--ntasks-per-node=1" in srun_argv
    record = json.loads((Path(env["SLURM_SUBMIT_DIR"]) / "runs/slurm-4242/slurm-4242.json").read_text())
    assert record["job_id"] == "4242"
    assert [s["hosts"] for s in record["starts"]] == [["node-a", "node-b"]]
    assert record["starts"][0]["main_process"] == f"addr-of-node-a:{20000 + 4242}"


def test_sbatch_keeps_run_dir_from_config_or_override(tmp_path):
    env = _sbatch_env(tmp_path, _SRUN_PER_NODE)
    cfg = _config(tmp_path, "run:\n  dir: from-config\ndata:\n  train_urls: s\ntrain:\n  num_steps: 5\n")
    run_dir = tmp_path / "run dir; with spaces"
    proc = subprocess.run(["bash", str(SBATCH), str(cfg), f"run.dir={run_dir}", "track.run_id=mine"],
                          cwd=env["SLURM_SUBMIT_DIR"], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads((tmp_path / "launch-0.json").read_text())["argv"]
    assert argv[argv.index("--config") :] == ["--config", str(cfg), f"run.dir={run_dir}", "track.run_id=mine"]
    assert (run_dir / "slurm-4242.json").is_file()

    (tmp_path / "launch-0.json").unlink()
    proc = subprocess.run(["bash", str(SBATCH), str(cfg)], cwd=env["SLURM_SUBMIT_DIR"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads((tmp_path / "launch-0.json").read_text())["argv"]
    assert argv[argv.index("--config") :] == ["--config", str(cfg), "track.run_id=slurm-4242"]
    assert (Path(env["SLURM_SUBMIT_DIR"]) / "from-config" / "slurm-4242.json").is_file()


def test_sbatch_rejects_invalid_config_before_launching(tmp_path):
    env = _sbatch_env(tmp_path, _SRUN_PER_NODE)
    cfg = _config(tmp_path)
    proc = subprocess.run(["bash", str(SBATCH), str(cfg), "train.num_stepz=3"], cwd=env["SLURM_SUBMIT_DIR"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "num_stepz" in proc.stderr
    assert not (tmp_path / "srun.argv").exists()


def test_sbatch_outside_slurm_is_a_clear_error(tmp_path):
    env = _sbatch_env(tmp_path, _SRUN_PER_NODE)
    del env["SLURM_JOB_ID"]
    proc = subprocess.run(["bash", str(SBATCH), "x.yaml"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "sbatch slurm/train.sbatch" in proc.stderr


# A training step that checkpoints on SIGUSR1/SIGTERM (here: writes a file) and exits 75,
# as `pipeline train` does.
_SRUN_TRAINING = """
    #!/bin/bash
    trap 'echo "$1" > /dev/null; touch "$FAKE_OUT/checkpointed-usr1"; exit 75' USR1
    trap 'touch "$FAKE_OUT/checkpointed-term"; exit 75' TERM
    touch "$FAKE_OUT/started"
    for i in $(seq 300); do sleep 0.1; done
    exit 0
    """


def _start_training_sbatch(tmp: Path) -> subprocess.Popen:
    env = _sbatch_env(tmp, _SRUN_TRAINING)
    proc = subprocess.Popen(["bash", str(SBATCH), str(_config(tmp))], cwd=env["SLURM_SUBMIT_DIR"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (tmp / "started").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "fake training step never started"
        time.sleep(0.05)
    return proc


def test_sbatch_usr1_forwards_waits_and_requeues(tmp_path):
    proc = _start_training_sbatch(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "checkpointed-usr1").exists()
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text().splitlines()


def test_sbatch_term_waits_and_does_not_requeue(tmp_path):
    proc = _start_training_sbatch(tmp_path)
    # SLURM signals every process of the job on scancel / time limit: here the step and the script.
    step = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "srun"], capture_output=True, text=True).stdout.split()
    assert step, "fake srun not found"
    os.kill(int(step[0]), signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert (tmp_path / "checkpointed-term").exists()
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()
