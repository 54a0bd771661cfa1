"""CUDA checks (``pytest -m gpu``; skipped without a GPU): run by scripts/device_check.sh on the
GPU machine (issue 18, section 4). They use the real CLI on one GPU, so the device paths of the
engines (DDP wrapper on one process, FSDP2, DeepSpeed ZeRO), bf16, the EMA and checkpoint
save + resume are exercised where they would run on a cluster."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import run_pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = ["--config", "configs/quickstart.yaml", "train.log_every_steps=1", "train.warmup_steps=0",
          "data.batch_per_rank=16", "data.num_workers=0", "track.wandb=off", "track.progress_bar=false",
          "train.num_sample_images=16", "objective=vdm", "vdm.num_timesteps=10", "vdm.channels=16",
          "train.checkpoint_every_steps=3"]
BACKENDS = {
    "ddp": ["engine.backend=accelerate"],
    "fsdp": ["engine.backend=accelerate", "engine.fsdp=full_shard"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
}


def test_bf16_autocast_forward_backward():
    """Under autocast the UNet computes in bf16 while its parameters and gradients stay fp32."""
    from pipeline.models import UNet

    net = UNet(1, channels=16, emb_dim=32).cuda()
    z, emb = torch.randn(4, 1, 16, 16, device="cuda"), torch.randn(4, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(z, emb)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in net.parameters() if p.requires_grad)
    ref = net(z, emb)  # fp32: bf16 has 8 mantissa bits, so agreement to ~1e-2 relative
    assert torch.allclose(out.float(), ref, atol=2e-2 * ref.abs().max().item() + 1e-3)


def test_ema_update_on_gpu():
    """The pipeline's EMA of a CUDA module (prepared by the Accelerate engine) follows
    e <- d e + (1 - d) theta with the warm-up decay d = min(decay, (1 + n) / (10 + n))."""
    import torch.nn as nn

    from pipeline.config import EngineConfig, TrainConfig
    from pipeline.train.ema import EMA
    from pipeline.train.engines import build_engine
    from pipeline.train.phases import Phase

    engine = build_engine(EngineConfig())
    assert engine.device.type == "cuda"
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    ph = engine.prepare(Phase("m", net, lr=1e-2), TrainConfig(num_steps=10))
    ema = EMA(ph, decay=0.9)
    ref = {n: p.detach().double().cpu() for n, p in ema.module.named_parameters()}
    for n_update in (1, 2, 3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(ph)
        d = min(0.9, (1 + n_update) / (10 + n_update))
        theta = {n: p.detach().double().cpu() for n, p in net.named_parameters()}
        ref = {n: d * ref[n] + (1 - d) * theta[n] for n in ref}
    for n, p in ema.module.named_parameters():
        assert p.device.type == "cuda"
        torch.testing.assert_close(p.double().cpu(), ref[n], rtol=1e-5, atol=1e-6)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# fp32 on DDP, bf16 on every backend: 5 x 2 short runs fit the check's time limit.
@pytest.mark.parametrize("backend, precision", [("ddp", "no"), *((b, "bf16") for b in BACKENDS)])
def test_train_checkpoint_resume_on_one_gpu(backend, precision, tmp_path, ising_shards):
    run = tmp_path / "run"
    args = ["train", *COMMON, *BACKENDS[backend], f"engine.mixed_precision={precision}", f"run.dir={run}",
            f"data.train_urls={ising_shards}"]
    run_pipeline(*args, "train.num_steps=3", timeout=240)
    run_pipeline(*args, "train.num_steps=6", timeout=240)  # resumes from step 3
    rows = [r for r in _rows(run) if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert math.isfinite(r["vdm/bits_per_dim"]) and r["vdm/skipped"] == 0.0, r
    assert max(r["sys/cuda_max_allocated_gib"] for r in rows) > 0  # it ran on the GPU
    assert (run / "checkpoints" / "step-00000006" / "manifest.json").is_file()
    assert any((run / "export").glob("*.safetensors"))  # the EMA weights exported
