"""slurm/launch_node.sh run outside SLURM, with a fake `accelerate launch`.

The fake is a PIPELINE_PYTHON that records its argv when asked to run accelerate (and runs
the real interpreter otherwise). What is checked is what reaches the launcher: the argv,
intact, with no shell ever interpreting a config value. slurm/train.sbatch:
test_launch_sbatch.py; the real cluster: tests/integration/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_NODE = REPO / "slurm" / "launch_node.sh"


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def _fake_python(tmp: Path) -> Path:
    """Records `-m accelerate.commands.launch ...` calls as JSON; otherwise the real python."""
    return _write_exe(
        tmp / "fake-python",
        f"""
        #!{sys.executable}
        import json, os, sys
        if sys.argv[1:3] == ["-m", "accelerate.commands.launch"]:
            with open("/proc/self/status") as f:
                ignored = int(next(l for l in f if l.startswith("SigIgn:")).split()[1], 16)
            record = {{
                "argv": sys.argv[3:],
                "usr1_ignored": bool(ignored >> (10 - 1) & 1),  # SIGUSR1 = 10 on Linux
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            }}
            out = os.path.join(os.environ["FAKE_OUT"], "launch-%s.json" % os.environ.get("SLURM_NODEID", "x"))
            with open(out, "w") as f:
                json.dump(record, f)
            raise SystemExit(int(os.environ.get("FAKE_EXIT", "0")))
        os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
        """,
    )


def _node_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIPELINE_", "OMP_"))}
    env.update(
        PIPELINE_PYTHON=str(_fake_python(tmp)),
        FAKE_OUT=str(tmp),
        SLURM_NNODES="2",
        SLURM_NODEID="1",
        PATH=f"{tmp}:/usr/bin:/bin",
    )
    if not (tmp / "nvidia-smi").exists():  # a CPU node, also on a machine that has GPUs
        _write_exe(tmp / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    env.update(extra)
    return env


def _launch_node(tmp: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run(
        ["bash", str(LAUNCH_NODE), *args], env=_node_env(tmp, **env), capture_output=True, text=True, timeout=30
    )
    out = tmp / f"launch-{env.get('SLURM_NODEID', '1')}.json"
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_launch_node_argv_and_hostile_values_arrive_intact(tmp_path):
    pwned = tmp_path / "pwned"
    hostile = [
        f"run.dir={tmp_path}/a b; touch {pwned}",
        f"track.group=$(touch {pwned})",
        f"track.tags=[`touch {pwned}`, '\"q\"']",
        "run.name=*",
    ]
    proc, rec = _launch_node(tmp_path, "127.0.0.1", "20042", "configs/my config.yaml", *hostile, SLURM_CPUS_ON_NODE="4")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None
    assert rec["argv"] == [
        "--multi_gpu",
        "--num_machines", "2",
        "--machine_rank", "1",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", "20042",
        "--num_processes", "2",
        "-m", "pipeline", "train", "--config", "configs/my config.yaml",
        *hostile,
    ]  # fmt: skip
    assert not pwned.exists()
    # The launcher must survive the checkpoint request (see launch_node.sh).
    assert rec["usr1_ignored"] is True
    assert rec["omp_num_threads"] == "4"  # 4 CPUs on the node / 1 process


def test_launch_node_processes_per_node_from_gpus(tmp_path):
    proc, rec = _launch_node(tmp_path, "node-a", "20001", "c.yaml", SLURM_GPUS_ON_NODE="4", SLURM_NNODES="3",
                             SLURM_NODEID="2", SLURM_CPUS_ON_NODE="16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = rec["argv"]
    assert argv[argv.index("--num_processes") + 1] == "12"
    assert argv[argv.index("--machine_rank") + 1] == "2"
    assert rec["omp_num_threads"] == "4"


def test_launch_node_nvidia_smi_counts_gpus(tmp_path):
    _write_exe(tmp_path / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: A (UUID: x)'\necho 'GPU 1: A (UUID: y)'\n")
    proc, rec = _launch_node(tmp_path, "h", "20001", "c.yaml", SLURM_NNODES="1", SLURM_NODEID="0")
    assert proc.returncode == 0, proc.stderr
    argv = rec["argv"]
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in argv


def test_launch_node_single_process_has_no_multi_gpu(tmp_path):
    proc, rec = _launch_node(tmp_path, "h", "20001", "c.yaml", SLURM_NNODES="1", SLURM_NODEID="0")
    assert proc.returncode == 0, proc.stderr
    assert "--multi_gpu" not in rec["argv"]
    assert rec["argv"][rec["argv"].index("--num_processes") + 1] == "1"


def test_launch_node_launch_config_replaces_multi_gpu(tmp_path):
    cfg = REPO / "launch" / "fsdp.yaml"
    proc, rec = _launch_node(tmp_path, "h", "20001", "c.yaml", PIPELINE_LAUNCH_CONFIG=str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert rec["argv"][:2] == ["--config_file", str(cfg)]
    assert "--multi_gpu" not in rec["argv"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["h", "20001"], {}, "usage"),
        (["h", "80", "c.yaml"], {}, "MAIN_PORT"),
        (["h", "20001", "c.yaml"], {"SLURM_NNODES": ""}, "SLURM_NNODES"),
        (["h", "20001", "c.yaml"], {"SLURM_NODEID": "x"}, "SLURM_NODEID"),
        (["h", "20001", "c.yaml"], {"PIPELINE_PROCS_PER_NODE": "0"}, "PIPELINE_PROCS_PER_NODE"),
        (["h", "20001", "c.yaml"], {"PIPELINE_PYTHON": "/nonexistent/python"}, "PIPELINE_PYTHON"),
        (["h", "20001", "c.yaml"], {"PIPELINE_LAUNCH_CONFIG": "/nonexistent.yaml"}, "PIPELINE_LAUNCH_CONFIG"),
    ],
)
def test_launch_node_rejects_bad_input(tmp_path, args, env, message):
    proc, rec = _launch_node(tmp_path, *args, **env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert rec is None  # nothing launched
