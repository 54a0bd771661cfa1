"""Shared fixtures: real shards written by the real CLI, free ports, subprocess helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-compiles a CPU comm op (shared-memory all-reduce) into TORCH_EXTENSIONS_DIR,
# ~25 s of g++ on an idle core, more under the suite's load. Newer torch guards the build with
# an OS advisory lock (filelock), which the kernel drops when its holder dies: one directory
# beside the venv is then safe to share between make test's workers and between runs, and the
# op is built once, not once per worker per run. Older torch guarded it with a lock *file*
# whose mere existence blocks every later build forever (pytorch/pytorch#189245) once a build
# is killed half-way (a timed-out test): there, a directory of this session's own.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    import inspect

    from torch.utils import cpp_extension

    if "FileLock(" in inspect.getsource(cpp_extension._jit_compile):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch-extensions")
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="pipeline-torch-ext-")
        atexit.register(shutil.rmtree, os.environ["TORCH_EXTENSIONS_DIR"], ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for launched processes: offline W&B, no network, one thread each."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run_pipeline(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=env or subprocess_env())
    if check and r.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def accelerate_launch(num_processes: int, *args: str, timeout: float = 600, env: dict | None = None,
                      check: bool = True) -> subprocess.CompletedProcess:
    """Real `accelerate launch --multi_gpu` (on a CPU-only machine: gloo processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "pipeline", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or subprocess_env())
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout[-5000:]}\nstderr:\n{r.stderr[-8000:]}")
    return r


@pytest.fixture(scope="session")
def ising_shards(tmp_path_factory) -> Path:
    """A small real Ising shard set (8x8, T = 3.0), written once per test session by the CLI."""
    out = tmp_path_factory.mktemp("data") / "ising-T3.0-L8"
    run_pipeline("shards", "ising", "--temperature", "3.0", "--size", "8", "--num-samples", "512",
                 "--out", str(out), "--seed", "0", "--samples-per-shard", "128")
    return out
