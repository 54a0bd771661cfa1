"""Issue 2's end-to-end path: Ising shards -> VDM -> accelerate launch on 2 processes ->
W&B offline -> checkpoint -> restart with the same run dir -> resume at the right step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import accelerate_launch, run_pipeline

pytestmark = pytest.mark.integration

TINY = ["train.log_every_steps=1", "train.warmup_steps=0", "vdm.num_timesteps=10", "vdm.channels=8",
        "data.batch_per_rank=16", "data.num_workers=0", "track.wandb=offline", "track.progress_bar=false",
        "train.num_sample_images=16"]


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(line)]


def test_two_processes_train_stop_resume_and_log_to_wandb(tmp_path, ising_shards):
    from pipeline.track.wandb_reader import read_history

    run = tmp_path / "run"
    common = ["train", "--config", "configs/quickstart.yaml", f"run.dir={run}", f"data.train_urls={ising_shards}",
              "train.checkpoint_every_steps=3", *TINY]
    accelerate_launch(2, *common, "train.num_steps=3")
    manifest = json.loads((run / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 2
    # Both ranks wrote their own data-stream position and RNG state.
    assert {"stream-rank00000.pt", "stream-rank00001.pt", "rng-rank00001.pt"} <= set(manifest["files"])

    second = accelerate_launch(2, *common, "train.num_steps=6")
    assert "resumed from step 3" in second.stdout
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # continuous, no step trained twice
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"

    history = read_history(run)
    steps = [h["_step"] for h in history if "vdm/recon_bpd" in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    for key in ("vdm/recon_bpd", "vdm/prior_bpd", "vdm/diffusion_bpd", "vdm/bits_per_dim", "vdm/lr",
                "perf/samples_per_s"):
        assert all(np.isfinite(h[key]) for h in history if "vdm/recon_bpd" in h), key
    last = [h for h in history if "vdm/recon_bpd" in h][-1]
    total = last["vdm/recon_bpd"] + last["vdm/prior_bpd"] + last["vdm/diffusion_bpd"]
    assert total == pytest.approx(last["vdm/bits_per_dim"], rel=1e-5)

    out = tmp_path / "samples.npy"
    run_pipeline("sample", "--run", str(run), "--num-samples", "5", "--out", str(out))
    x = np.load(out)
    assert x.shape == (5, 1, 8, 8) and set(np.unique(x)) <= {-1.0, 1.0}
