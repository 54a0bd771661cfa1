"""DeepSpeed bf16 converts the weights themselves (no autocast); the engine casts the float32
inputs where they meet them (pipeline/train/engines/half_weights.py), so a VDM and a
conditional GAN train with the real `pipeline train` (DeepSpeed on CPU, 1 process) and their EMA
copies sample. Before that cast lived in the engine the VDM stopped at its first Linear
("mat1 and mat2 must have the same dtype") and only the GAN, which cast for itself, ran."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_pipeline

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("deepspeed_half_weights")]

COMMON = ["train.num_steps=2", "train.warmup_steps=0", "train.log_every_steps=1", "data.batch_per_rank=8",
          "data.num_workers=0", "track.wandb=off", "track.progress_bar=false", "train.num_sample_images=4",
          "engine.backend=deepspeed", "engine.zero_stage=2", "engine.mixed_precision=bf16"]


@pytest.fixture(scope="module")
def multi_t_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ising-T2-T3-L16"
    run_pipeline("shards", "ising", "--temperature", "2.0", "3.0", "--size", "16", "--num-samples", "32",
                 "--out", str(out), "--seed", "0")
    return out


@pytest.mark.parametrize("preset, loss_key", [("quickstart", "vdm/bits_per_dim"), ("gan_ising", "g/loss_g")])
def test_bf16_weights_train_and_sample(preset, loss_key, multi_t_shards, tmp_path):
    run = tmp_path / "run"
    # the VDM conditioned on the temperature too: its label embedding (Fourier features) under bf16
    extra = ["vdm.channels=8", "vdm.num_timesteps=10", "data.label_key=temperature"] if preset == "quickstart" else []
    run_pipeline("train", "--config", f"configs/{preset}.yaml", f"run.dir={run}", f"data.train_urls={multi_t_shards}",
                 *COMMON, *extra, timeout=600)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[loss_key]) for r in rows), rows
    out = run_pipeline("sample", "--run", str(run), "--num-samples", "4", "--out", str(tmp_path / "s.npy"))
    assert "wrote 4 samples" in out.stdout
