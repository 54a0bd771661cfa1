"""A GAN with both networks and both optimizers sharded, real `pipeline train` on 2 CPU
processes (issue 18): DeepSpeed ZeRO-3 and FSDP2 full_shard, a tiny conv GAN, gan.latent_seed on.

* Same world size: N steps, stop, resume to 2N, against an uninterrupted 2N run launched beside
  it: every logged metric, both networks' full fp32 weights and both Adam states (merged from
  the ranks' shards by DeepSpeed's zero_to_fp32 / torch.distributed.checkpoint, independently of
  the engine that wrote them), the EMA and the export are bitwise equal.
* 2 -> 1: the N-step checkpoint resumed on one process with the same global batch (1 x 16 for
  2 x 8) continues at the exact global sample position (a pure function of the step: 2 phases x
  16 samples a step), and with gan.latent_seed draws the same latents, so it trains like the
  uninterrupted 2-process run up to float summation order. Only the per-rank batch statistics
  (d/diversity_ratio, d/g_collapsed: pairwise distances within a rank's batch) depend on the split.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, subprocess_env
from tests.integration.test_exact_resume import Launch, _flatten, latest, metric_rows, train_args

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("gan_sharded_resume")]

N = 3  # steps before the stop; the runs end at 2N
GLOBAL_BATCH = 16  # 2 ranks x data.batch_per_rank=8 (train_args), or 1 x 16
BACKENDS = {"zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"], "fsdp": ["engine.fsdp=full_shard"]}
SHARD_FILES = {"zero3": "ds-{phase}/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
               "fsdp": "fsdp-{phase}/__{rank}_0.distcp"}
SPLIT_DEPENDENT = ("d/diversity_ratio", "d/g_collapsed")


def _args(run: Path, shards: Path, backend: str, num_steps: int, *extra: str) -> list[str]:
    return train_args(run, shards, "gan", *BACKENDS[backend], "gan.latent_seed=3", f"train.num_steps={num_steps}",
                      f"train.checkpoint_every_steps={N}", *extra)


@pytest.fixture(scope="module", params=list(BACKENDS))
def runs(request, tmp_path_factory, ising_shards) -> dict:
    backend = request.param
    root = tmp_path_factory.mktemp(f"gan-{backend}")
    full, part, one = root / "full", root / "part", root / "one"
    a = Launch(_args(full, ising_shards, backend, 2 * N), root / "full.log")
    b = Launch(_args(part, ising_shards, backend, N), root / "part.log")
    a.check(600)
    b.check(600)
    shutil.copytree(part, one)
    resumed = Launch(_args(part, ising_shards, backend, 2 * N), root / "part-resumed.log")
    with open(root / "one.log", "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline",
                                 *_args(one, ising_shards, backend, 2 * N, "data.batch_per_rank=16")],
                                cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
    resumed_log = resumed.check(600)
    assert proc.wait(600) == 0, (root / "one.log").read_text()[-6000:]
    return {"backend": backend, "full": full, "part": part, "one": one, "resumed_log": resumed_log,
            "one_log": (root / "one.log").read_text()}


def _checkpoint(run: Path, step: int | None = None) -> Path:
    return run / "checkpoints" / (latest(run) if step is None else f"step-{step:08d}")


def _network_state(run: Path, backend: str, step: int | None = None) -> dict[str, object]:
    """Both phases' full weights and Adam state at a checkpoint (default the newest), merged from
    the shards."""
    ckpt, out = _checkpoint(run, step), {}
    for phase in ("d", "g"):
        if backend == "zero3":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed picks its accelerator on import
            from pipeline.train.engines.deepspeed_reshard import consolidate

            merged = consolidate(ckpt / f"ds-{phase}" / "state")
        else:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(ckpt / f"fsdp-{phase}", Path(tmp) / "full.pt")
                merged = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
        out.update({f"{phase}{k}": v.detach() if isinstance(v, torch.Tensor) else v for k, v in _flatten(merged)})
    assert sum(isinstance(v, torch.Tensor) and v.numel() > 1 for v in out.values()) >= 8, sorted(out)
    return out


def _shared_state(run: Path) -> dict[str, object]:
    """The EMA of G, the trainer counters and the export (rank 0's files)."""
    from safetensors.torch import load_file

    ckpt, out = _checkpoint(run), {}
    for name in ("ema.pt", "trainer.pt"):
        out.update({f"{name}{k}": v for k, v in _flatten(torch.load(ckpt / name, map_location="cpu",
                                                                       weights_only=True))})
    out.update({f"export/{k}": v for k, v in load_file(str(run / "export" / "weights.safetensors")).items()})
    return out


def _compare(a: dict, b: dict, *, rel: float = 0.0, abs_: float = 0.0) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = []
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor):
            x, y = x.double(), y.double()
            ok = torch.equal(x, y) if rel == abs_ == 0.0 else bool(torch.allclose(x, y, rtol=rel, atol=abs_))
        elif isinstance(x, float) and isinstance(y, float) and (rel or abs_):
            ok = y == pytest.approx(x, rel=rel, abs=abs_)
        else:
            ok = x == y
        if not ok:
            differ.append(k)
    return differ


def _metrics(run: Path, steps: range) -> dict[str, float]:
    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, 2 * N + 1))
    return {f"{s}/{k}": v for s in steps for k, v in rows[s].items()
            if k.split("/")[0] in ("d", "g", "train") and not k.endswith("data_wait_s")}


def test_both_networks_and_optimizers_are_sharded_per_rank(runs):
    manifest = json.loads((_checkpoint(runs["full"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for phase in ("d", "g"):
        for rank in (0, 1):
            assert SHARD_FILES[runs["backend"]].format(phase=phase, rank=rank) in manifest["files"]


def test_resume_on_the_same_world_size_is_bitwise_equal_to_uninterrupted(runs):
    full, part, backend = runs["full"], runs["part"], runs["backend"]
    assert f"resumed from step {N} " in runs["resumed_log"]
    assert latest(full) == latest(part) == f"step-{2 * N:08d}"
    a, b = _metrics(full, range(1, 2 * N + 1)), _metrics(part, range(1, 2 * N + 1))
    assert len(a) > 20 * N
    assert not _compare(a, b)
    assert not _compare(_network_state(full, backend), _network_state(part, backend))
    assert not _compare(_shared_state(full), _shared_state(part))


def test_two_to_one_resume_continues_the_exact_position_with_the_same_latents(runs):
    full, one, backend = runs["full"], runs["one"], runs["backend"]
    assert f"resumed from step {N} " in runs["one_log"] and "world size 2 -> 1" in runs["one_log"]
    data = json.loads((_checkpoint(one) / "manifest.json").read_text())["data"]
    assert data == {"global_samples_consumed": 2 * N * 2 * GLOBAL_BATCH, "world_size": 1, "epoch": 0}
    steps = range(N + 1, 2 * N + 1)
    a, b = _metrics(full, steps), _metrics(one, steps)
    split = [k for k in a if k.split("/", 1)[1] in SPLIT_DEPENDENT]
    assert len(split) == len(steps) * len(SPLIT_DEPENDENT)
    for k in split:
        a.pop(k), b.pop(k)
    assert not _compare(a, b, rel=1e-5, abs_=1e-7)
    # The weights and Adam moments: equal up to summation order, where the last N steps moved
    # every weight tensor by far more than that tolerance.
    ref, got = _network_state(full, backend), _network_state(one, backend)
    assert not _compare(ref, got, rel=1e-5, abs_=1e-7)
    before = _network_state(full, backend, step=N)
    weights = [k for k, v in ref.items() if isinstance(v, torch.Tensor) and v.numel() > 1 and "exp_avg" not in k]
    assert weights and all(float((ref[k] - before[k]).abs().max()) > 1e-5 for k in weights), weights
    assert not _compare(_shared_state(full), _shared_state(one), rel=1e-5, abs_=1e-7)
