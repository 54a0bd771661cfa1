"""The importance sampler's loss history stays identical on both ranks of a real 2-process
run, across a stop and a resume.

How the ranks are compared without a test hook: every step the VDM logs
``sampler_history_checksum``, a float64 fingerprint of the history that drew that step's
time steps (ImportanceSampler.history_checksum). The loop averages logged metrics over ranks
(an all-reduce of float64 sums), so the logged value is (c_rank0 + c_rank1) / 2, which
equals rank 0's own c_rank0 exactly only when the ranks agree. Rank 0's history after step
s is in the checkpoint of step s (the EMA copy holds the module's buffers), and it is the
history that drew step s + 1: so logged(s + 1) must equal checksum(checkpoint s), bit for
bit, for every step, including the first one after the resume.

Backend: DeepSpeed ZeRO-2. Under DDP (Accelerate) the check would pass whatever the sampler
does: DDP broadcasts module buffers from rank 0 before every forward pass
(broadcast_buffers=True), which overwrites a diverged history before it is used. DeepSpeed
does not, so there the agreement rests on the sampler's own all-gathered update.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.objectives.vdm.timesteps import ImportanceSampler
from tests.conftest import accelerate_launch

pytestmark = pytest.mark.integration

NUM_BINS = 5  # vdm.num_timesteps=6: five diffusion terms, one bin each
HISTORY = 2
BATCH_PER_RANK = 8
WORLD = 2


def args(run: Path, shards: Path, num_steps: int) -> list[str]:
    return [
        "train", "--config", "configs/quickstart.yaml", f"run.dir={run}", f"data.train_urls={shards}",
        f"train.num_steps={num_steps}", "train.checkpoint_every_steps=1", "train.keep_last_checkpoints=20",
        "train.log_every_steps=1", "train.warmup_steps=0", f"data.batch_per_rank={BATCH_PER_RANK}",
        "data.num_workers=0", "track.wandb=off", "track.progress_bar=false", "train.num_sample_images=4",
        "engine.timeout_s=30", "engine.backend=deepspeed", "engine.zero_stage=2",
        "vdm.num_timesteps=6", "vdm.channels=4", "vdm.emb_dim=8",
        "vdm.timestep_sampler=importance", f"vdm.importance_history={HISTORY}",
    ]


def checkpointed_sampler(run: Path, step: int) -> ImportanceSampler:
    state = torch.load(run / "checkpoints" / f"step-{step:08d}" / "ema.pt", map_location="cpu", weights_only=True)
    s = ImportanceSampler(NUM_BINS, history=HISTORY)
    s.load_state_dict({k.removeprefix("sampler."): v for k, v in state["module"].items() if k.startswith("sampler.")})
    return s


def test_importance_history_is_identical_on_both_ranks_through_a_resume(tmp_path, ising_shards):
    run = tmp_path / "run"
    accelerate_launch(WORLD, *args(run, ising_shards, 3), timeout=300)
    resumed = accelerate_launch(WORLD, *args(run, ising_shards, 6), timeout=300)
    assert "resumed from step 3" in resumed.stdout + resumed.stderr

    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "vdm/sampler_history_checksum" in row:
            rows[row["step"]] = row
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[1]["vdm/sampler_history_checksum"] == 0.0  # the first step drew from an empty history
    for step in range(1, 6):
        s = checkpointed_sampler(run, step)
        # Every loss of every rank went into the history: all_gather worked, step by step.
        assert int(s.count.sum()) == step * WORLD * BATCH_PER_RANK
        logged = rows[step + 1]
        assert logged["vdm/sampler_history_count"] == step * WORLD * BATCH_PER_RANK
        # Mean over ranks == rank 0's value: rank 1 held the same history (bitwise).
        assert logged["vdm/sampler_history_checksum"] == s.history_checksum(), step
    final = checkpointed_sampler(run, 5)
    assert bool((final.count >= HISTORY).all()) and rows[6]["vdm/sampler_ready"] == 1.0
    # The proposal is actually non-uniform, so the importance path (weights != 1) was exercised.
    assert float(final.probs().max() - final.probs().min()) > 1e-3
