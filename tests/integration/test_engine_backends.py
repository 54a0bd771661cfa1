"""Engine backends under real `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Per backend (DDP; DeepSpeed ZeRO-1/2/3; FSDP2 full_shard and shard_grad_op) three launches of tests/integration/engine_toy.py
share one checkpoint directory:

1. 2 processes: toy regression + toy GAN train 3 steps, save through the real Checkpointer;
   a NaN loss on one rank skips the step on both; restart in-process and resume.
2. 1 process: resume the 2-process checkpoint (2 -> 1), train 2 steps, save.
3. 2 processes: resume the 1-process checkpoint (1 -> 2).

Every restored parameter, Adam moment, EMA weight and LR is compared bitwise with what was
saved. The first DeepSpeed launch JIT-compiles a comm op (~25 s, kept beside the venv afterwards:
tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train.schedule import lr_lambda
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).parent))
from engine_toy import TRAIN  # noqa: E402

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("engine_backends")]

ROOT = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("engine_toy.py")
BACKENDS = {
    "ddp": ["--backend", "accelerate"],
    "zero1": ["--backend", "deepspeed", "--zero-stage", "1"],
    "zero2": ["--backend", "deepspeed", "--zero-stage", "2"],
    "zero3": ["--backend", "deepspeed", "--zero-stage", "3"],
    "fsdp": ["--backend", "accelerate", "--fsdp", "full_shard"],
    "fsdp_grad_op": ["--backend", "accelerate", "--fsdp", "shard_grad_op"],
    # train.async_checkpoint: the first run trains on while its checkpoint is written (DCP)
    "fsdp_async": ["--backend", "accelerate", "--fsdp", "full_shard", "--async-checkpoint"],
}


def _launch(num_processes: int, args: list[str], log: Path) -> None:
    py = sys.executable
    if num_processes == 1:
        cmd = [py, str(TOY), *args]
    else:
        cmd = [str(Path(py).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               # a port of its own: make test's other worker may be launching at the same time
               # (accelerate's default 29500 then fails with EADDRINUSE)
               "--main_process_port", str(free_port()), str(TOY), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")


@pytest.fixture(scope="module", params=list(BACKENDS))
def runs(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    base = [*BACKENDS[name], "--ckpt", str(d / "ckpt")]
    _launch(2, [*base, "--mode", "first", "--out", str(d / "first.pt")], d / "first.log")
    _launch(1, [*base, "--mode", "resume", "--out", str(d / "r1.pt")], d / "r1.log")
    _launch(2, [*base, "--mode", "resume", "--out", str(d / "r2.pt")], d / "r2.log")
    out = {k: torch.load(d / f"{k}.pt", weights_only=False) for k in ("first", "r1", "r2")}
    yield out
    shutil.rmtree(d, ignore_errors=True)


def _assert_same(saved: dict, restored: dict) -> None:
    for part in ("params", "moments", "ema"):
        assert saved[part].keys() == restored[part].keys()
        for phase in saved[part]:
            a, b = saved[part][phase], restored[part][phase]
            assert a.keys() == b.keys(), (part, phase)
            assert a, (part, phase)  # something was compared
            for k in a:
                assert torch.equal(a[k], b[k]), f"{part}/{phase}/{k} differs after resume"
    assert saved["lr"] == restored["lr"]


def test_trains_gan_with_frozen_modules_and_ema(runs):
    for r in runs.values():
        assert r["frozen_ok"], "a phase changed a module it does not train"
        assert r["ema_ok"], "EMA differs from d*e + (1-d)*theta with the full parameters"
        assert all(torch.isfinite(torch.tensor(n)) for _, n in r["norms"])
    # the LR follows the warm-up + cosine schedule once per step, on any world size
    f = lr_lambda(TRAIN)
    assert runs["first"]["saved"]["lr"]["reg"] == pytest.approx(1e-2 * f(3), rel=1e-12)
    assert runs["r1"]["saved"]["lr"]["reg"] == pytest.approx(1e-2 * f(5), rel=1e-12)  # resumed at 3, +2


def test_resume_same_world_size_is_bitwise(runs):
    first = runs["first"]
    assert first["fresh_differs"]  # the restart really started from other weights
    assert first["restored_step"] == first["saved_step"] == 3
    _assert_same(first["saved"], first["restored"])


def test_nan_on_one_rank_skips_everywhere_and_changes_nothing(runs):
    first = runs["first"]
    assert first["nan_skipped"] and first["nan_skipped_all"] == 2.0
    assert first["nan_params_equal"], "parameters changed on a skipped step"
    assert first["nan_moments_equal"], "optimizer state changed on a skipped step"
    assert first["nan_lr_advanced"]
    assert not first["after_nan_skipped"] and first["after_nan_changed"]


def test_resume_two_to_one_process(runs):
    r1 = runs["r1"]
    assert (r1["world_size"], r1["restored_from_world_size"]) == (1, 2)
    _assert_same(runs["first"]["saved"], r1["restored"])


def test_resume_one_to_two_processes(runs):
    r2 = runs["r2"]
    assert (r2["world_size"], r2["restored_from_world_size"]) == (2, 1)
    assert r2["restored_step"] == runs["r1"]["saved_step"] == 5
    _assert_same(runs["r1"]["saved"], r2["restored"])
