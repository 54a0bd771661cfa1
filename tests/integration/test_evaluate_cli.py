"""End to end: `pipeline shards` -> `pipeline train` (a tiny VDM, a few steps) ->
`pipeline evaluate`; the last stdout line is one JSON object with finite results."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration


def test_shards_train_evaluate(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    run_pipeline("shards", "ising", "--temperature", "3.0", "--size", "8", "--num-samples", "256",
                 "--out", str(data), "--seed", "0")
    run_pipeline("train", "--config", "configs/quickstart.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "train.num_steps=4", "train.checkpoint_every_steps=4", "train.warmup_steps=0",
                 "vdm.num_timesteps=10", "vdm.channels=8", "data.batch_per_rank=16", "data.num_workers=0",
                 "track.wandb=off", "track.progress_bar=false")
    out = tmp_path / "eval.json"
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "128", "--seed", "1",
                     "--elbo-num-samples", "16", "--elbo-noise-samples", "2", "--out", str(out))
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    for key in ("energy_per_spin", "energy_exact", "abs_magnetisation", "magnetisation_exact", "w1_energy",
                "bits_per_spin", "entropy_bits_per_spin", "specific_heat", "susceptibility", "correlation_length",
                "pvalue_energy", "bits_per_dim", "recon_bpd", "prior_bpd", "diffusion_bpd", "stderr"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["bits_per_dim"] == result["bits_per_spin"] and result["stderr"] > 0
    assert result["recon_bpd"] + result["prior_bpd"] + result["diffusion_bpd"] == pytest.approx(result["bits_per_dim"])
    assert isinstance(result["flags"], list)
    assert result["step"] == 4 and result["temperatures"] == [3.0] and result["num_generated"] == 128
    # the sampler as resolved: discrete time T = 10 takes T - 1 ancestral steps on its own latents
    assert result["sampling"] == {"sampler": "ancestral", "eta": None, "grid": "time", "num_steps": 9}
    assert result["energy_exact"] == pytest.approx(-0.8173096, abs=1e-6)  # Onsager, T = 3
    # A 4-step model cannot beat the exact entropy (the bound holds for any model).
    assert result["bits_per_spin"] > result["entropy_bits_per_spin_finite"]

    bad = run_pipeline("evaluate", "--run", str(run), "--data", str(tmp_path / "missing"), check=False)
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr
