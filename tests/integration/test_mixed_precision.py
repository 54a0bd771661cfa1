"""bf16 on DDP and FSDP2 under a real 2-process `accelerate launch` (gloo on CPU): the same tiny
conv regression trained in fp32 and bf16. bf16 computes in bf16 and reduces and keeps master
weights and Adam state in fp32; its loss curve follows fp32's within a stated tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("mixed_precision")]

ROOT = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("precision_toy.py")
BACKENDS = {"ddp": ["--backend", "accelerate"], "fsdp": ["--backend", "accelerate", "--fsdp", "full_shard"]}
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); over 15 Adam steps the
# curves drift apart by at most a few per cent of the loss.
REL_TOL = 0.05


def _run(backend: str, precision: str, tmp: Path) -> dict:
    out = tmp / f"{backend}-{precision}.pt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(TOY), *BACKENDS[backend], "--mixed-precision", precision, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    return {(b, p): _run(b, p, tmp) for b in BACKENDS for p in ("no", "bf16")}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_computes_in_bf16_and_keeps_fp32_state(runs, backend):
    fp32, bf16 = runs[(backend, "no")], runs[(backend, "bf16")]
    assert fp32["world_size"] == bf16["world_size"] == 2
    assert (fp32["forward_weight"], fp32["forward_output"]) == ("torch.float32", "torch.float32")
    assert bf16["forward_output"] == "torch.bfloat16"  # the conv ran in bf16
    for r in (fp32, bf16):  # master weights, their gradients and Adam moments stay fp32
        assert r["param_dtypes"] == r["grad_dtypes"] == r["moment_dtypes"] == ["torch.float32"]


def test_fsdp_bf16_gathers_bf16_and_reduces_fp32(runs):
    fp32, bf16 = runs[("fsdp", "no")], runs[("fsdp", "bf16")]
    assert bf16["forward_weight"] == "torch.bfloat16"  # MixedPrecisionPolicy(param_dtype=bf16)
    assert bf16["reduce_scatter"] == fp32["reduce_scatter"] == ["torch.float32"]  # reduce_dtype=fp32


def test_ddp_bf16_is_autocast_over_fp32_weights(runs):
    assert runs[("ddp", "bf16")]["forward_weight"] == "torch.float32"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_loss_curve_follows_fp32(runs, backend):
    fp32, bf16 = runs[(backend, "no")]["losses"], runs[(backend, "bf16")]["losses"]
    assert fp32[-1] < 0.5 * fp32[0]  # it learns, so the comparison is over a moving curve
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert abs(a - b) <= REL_TOL * a, (step, a, b)
    assert fp32 != bf16  # bf16 really changed the arithmetic
