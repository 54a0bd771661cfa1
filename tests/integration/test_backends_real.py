"""Each backend trains the real objectives (tiny VDM, tiny non-saturating GAN) with the real
`pipeline train` on 2 CPU processes, stops, and resumes: steps continue, metrics.jsonl is
continuous, every logged value finite.

DDP is covered by the kill-and-resume runs of test_exact_resume (reused here, no extra
launch). DeepSpeed ZeRO-2 gets its own train + resume per objective. ZeRO-1/3 are covered on
toy models by test_engine_backends (the time budget of the suite leaves no room for more real
launches). FSDP (full_shard) trains each objective on 2 processes exactly like DDP (the
logged metrics equal those of a DDP run launched beside it), writes its
shards per rank, and resumes on 1 process (2 -> 1; 1 -> 2 and shard_grad_op are covered on
toy models by test_engine_backends).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_pipeline
from tests.integration.test_exact_resume import (
    EVERY, NUM_STEPS, TRAIN_RUNS, Launch, killed_run, latest, logged_steps, metric_rows, runs_root, train_args,
)

pytestmark = pytest.mark.integration
__all__ = ["runs_root"]

PHASES = {"vdm": ["vdm"], "gan": ["d", "g"]}


def _assert_metrics_finite(run, objective):
    for step, row in metric_rows(run).items():
        for phase in PHASES[objective]:
            assert row[f"{phase}/skipped"] == 0.0, (step, phase)
            for key in ("loss" if objective == "gan" else "bits_per_dim", "grad_norm", "lr"):
                name = f"{phase}/{key}"
                if name in row:
                    assert math.isfinite(row[name]), (step, name, row[name])
        assert row["train/samples_seen"] == step * 2 * 8


@TRAIN_RUNS
@pytest.mark.parametrize("objective", ["vdm", "gan"])
def test_ddp_resume_continues(objective, runs_root, ising_shards):
    killed = killed_run(objective, runs_root, ising_shards)
    assert logged_steps(killed.run) == list(range(1, NUM_STEPS + 1))
    _assert_metrics_finite(killed.run, objective)


@pytest.mark.parametrize("objective", ["vdm", "gan"])
def test_deepspeed_zero2_trains_and_resumes(objective, tmp_path, ising_shards):
    run = tmp_path / "run"
    common = ["engine.backend=deepspeed", "engine.zero_stage=2", "train.checkpoint_every_steps=4"]
    Launch(train_args(run, ising_shards, objective, *common, "train.num_steps=4"), tmp_path / "a.log").check(600)
    manifest = json.loads((run / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for phase in PHASES[objective]:
        # ZeRO-2 shards the optimizer state: one file per rank, written by each rank.
        shards = [f for f in manifest["files"] if f.startswith(f"ds-{phase}/") and "optim_states" in f]
        assert len(shards) == 2, sorted(manifest["files"])
    text = Launch(train_args(run, ising_shards, objective, *common, "train.num_steps=8"), tmp_path / "b.log").check(600)
    assert "resumed from step 4 " in text
    assert logged_steps(run) == list(range(1, 9))
    assert latest(run) == "step-00000008"
    _assert_metrics_finite(run, objective)
    rows = metric_rows(run)
    # Training moved on after the resume (the optimizer and its state were live).
    first = PHASES[objective][0]
    assert rows[8][f"{first}/grad_norm"] > 0


# The VDM with a learned schedule and learned endpoints: 0-dim parameters (replicated, not
# sharded, under FSDP) and gamma(t) read outside forward by the log report.
FSDP_EXTRA = {"vdm": ["vdm.num_timesteps=0", "vdm.schedule=learned", "vdm.learn_endpoints=true",
                      "vdm.timestep_sampler=learned-schedule"], "gan": []}


@pytest.mark.parametrize("objective", ["vdm", "gan"])
def test_fsdp_trains_like_ddp_and_resumes_on_one_process(objective, tmp_path, ising_shards):
    run, ddp_run = tmp_path / "run", tmp_path / "ddp"
    args = [*FSDP_EXTRA[objective], f"train.num_steps={EVERY}"]
    fsdp_launch = Launch(train_args(run, ising_shards, objective, "engine.fsdp=full_shard", *args), tmp_path / "a.log")
    ddp_launch = Launch(train_args(ddp_run, ising_shards, objective, *args), tmp_path / "ddp.log")
    fsdp_launch.check(600)
    ddp_launch.check(600)
    manifest = json.loads((run / "checkpoints" / f"step-{EVERY:08d}" / "manifest.json").read_text())
    for phase in PHASES[objective]:
        # torch.distributed.checkpoint: each rank wrote its own shards of model and optimizer.
        assert {f"fsdp-{phase}/__0_0.distcp", f"fsdp-{phase}/__1_0.distcp"} <= set(manifest["files"])
    # Same initial weights (rank 0's), same data, same averaged gradients as DDP: the same
    # training, up to the order of floating-point sums.
    ddp, fsdp = metric_rows(ddp_run), metric_rows(run)
    assert sorted(fsdp) == sorted(ddp) == list(range(1, EVERY + 1))
    compared = 0
    for step in fsdp:
        for key, value in fsdp[step].items():
            if key.split("/")[0] in PHASES[objective] and not key.endswith("data_wait_s"):
                expected = ddp[step][key]
                if expected is None:  # not finite (e.g. a spread of one sample): JSON null
                    assert value is None, (step, key)
                else:
                    assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), (step, key)
                compared += 1
    assert compared > 5 * EVERY
    if objective == "vdm":  # the learned endpoints moved (their replicated gradients were applied)
        assert fsdp[EVERY]["vdm/gamma_t0.00"] != fsdp[1]["vdm/gamma_t0.00"]
    # 2 -> 1 process: the shards are resharded onto a world of one.
    more = [*FSDP_EXTRA[objective], f"train.num_steps={EVERY + 2}"]
    r = run_pipeline(*train_args(run, ising_shards, objective, "engine.fsdp=full_shard", *more))
    assert f"resumed from step {EVERY} " in r.stdout
    assert latest(run) == f"step-{EVERY + 2:08d}"
    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, EVERY + 3))
    for step in (EVERY + 1, EVERY + 2):
        assert rows[step]["train/samples_seen"] == EVERY * 2 * 8 + (step - EVERY) * 8
        for phase in PHASES[objective]:
            assert rows[step][f"{phase}/skipped"] == 0.0 and math.isfinite(rows[step][f"{phase}/grad_norm"])
