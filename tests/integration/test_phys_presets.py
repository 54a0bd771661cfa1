"""The phi^4 and calorimeter presets train through the CLI on data the sources write (a few
steps each, shrunk data): `pipeline shards phi4` -> configs/vdm_phi4.yaml -> `pipeline
evaluate` (observables vs the exact free field), configs/vdm_phi4_broken.yaml, the same with configs/gan_phi4.yaml at an
interacting point (vs the HMC ensemble), and `pipeline
shards calo` -> `pipeline shards hdf5` -> configs/vdm_calo.yaml (its full 45 x 16 x 9 geometry,
which the 3D UNet pads to 48 x 16 x 12 inside)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration

FEW_STEPS = ("train.num_steps=3", "train.checkpoint_every_steps=3", "train.warmup_steps=0", "train.log_every_steps=1",
             "data.batch_per_rank=16", "data.num_workers=0", "data.shuffle_buffer=64", "track.wandb=off",
             "track.progress_bar=false")


def _steps(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "vdm/bits_per_dim" in r]


def _phi4_shards(data, kappa: str, lam: str, num_samples: int, num_chains: int) -> None:
    """A shrunk (8x8, short HMC) phi^4 shard set at (kappa, lambda)."""
    run_pipeline("shards", "phi4", "--size", "8", "--kappa", kappa, "--lam", lam, "--num-samples", str(num_samples),
                 "--burn-in", "20", "--pilot", "40", "--num-chains", str(num_chains), "--out", str(data))


def _train_vdm_three_steps(config: str, run, data) -> None:
    """``config`` with a small UNet for FEW_STEPS; each of the 3 steps logs a finite ELBO estimate."""
    run_pipeline("train", "--config", config, f"run.dir={run}", f"data.train_urls={data}",
                 "vdm.channels=8", "vdm.emb_dim=16", *FEW_STEPS)
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["vdm/bits_per_dim"]) for r in steps)


def test_vdm_phi4_preset_trains(tmp_path):
    data, run = tmp_path / "phi4", tmp_path / "run"
    _phi4_shards(data, "0.2", "0", num_samples=128, num_chains=32)
    _train_vdm_three_steps("configs/vdm_phi4.yaml", run, data)
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "32", "--num-steps", "4",
                     "--elbo-num-samples", "8", "--elbo-noise-samples", "2")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["evaluation"] == "phi4" and result["reference_kind"] == "exact free field"
    assert result["susceptibility_reference"] == pytest.approx(2.5) and result["num_generated"] == 32
    for key in ("abs_magnetisation", "susceptibility", "susceptibility_z", "propagator_max_abs_z", "bits_per_dim",
                "nats_per_dim", "nll_exact_nats_per_dim", "entropy_exact_nats_per_dim"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    # A 3-step model is far from the field: its negative ELBO is above the exact NLL of the same configurations.
    assert result["nats_per_dim"] > result["nll_exact_nats_per_dim"]
    # --sampler reaches the phi^4 evaluation: the same seed under DDIM draws other configurations.
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "32", "--num-steps", "4",
                     "--sampler", "ddim", "--elbo-num-samples", "0")
    ddim = json.loads(r.stdout.strip().splitlines()[-1])
    assert ddim["sampling"]["sampler"] == "ddim" and ddim["abs_magnetisation"] != result["abs_magnetisation"]


def test_vdm_phi4_broken_preset_trains_with_the_gaussian_skip(tmp_path):
    """configs/vdm_phi4_broken.yaml (shrunk lattice, its broken-phase point): the Gaussian skip's
    data moments are gathered while training and exported with the weights."""
    from safetensors.torch import load_file

    data, run = tmp_path / "phi4", tmp_path / "run"
    _phi4_shards(data, "0.35", "0.02", num_samples=64, num_chains=16)
    _train_vdm_three_steps("configs/vdm_phi4_broken.yaml", run, data)
    weights = load_file(str(run / "export" / "weights.safetensors"))
    assert float(weights["denoiser.skip.count"]) == 3 * 16  # 3 steps x 16 configurations
    mean_sq = weights["denoiser.skip.sums"][1] / weights["denoiser.skip.count"]
    assert float(mean_sq.mean()) > 2.0  # broken phase: sites far from unit scale (near +-3 at kappa 0.35)


def test_gan_phi4_preset_trains(tmp_path):
    """configs/gan_phi4.yaml at its symmetric-phase point (shrunk lattice): MLP G and D
    (narrowed), 3 steps, then `pipeline evaluate` against the HMC ensemble (lambda > 0: no
    exact reference)."""
    data, run = tmp_path / "phi4", tmp_path / "run"
    _phi4_shards(data, "0.22", "0.02", num_samples=128, num_chains=32)
    run_pipeline("train", "--config", "configs/gan_phi4.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "gan.channels=[8,16]", "gan.latent_dim=8", *FEW_STEPS)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "g/loss_g" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in steps for k in ("g/loss_g", "d/loss_d", "d/gradient_penalty"))
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "64")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["evaluation"] == "phi4" and result["reference_kind"] == "HMC ensemble"
    assert result["objective"] == "gan" and result["num_generated"] == 64
    for key in ("abs_magnetisation", "susceptibility", "susceptibility_z", "susceptibility_reference",
                "propagator_max_abs_z", "minkowski_max_abs_z", "minkowski_v2_chi2"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert len(result["minkowski"]["reference_mean"]) == 3  # v0, v1, v2 against the HMC ensemble's
    assert "bits_per_dim" not in result  # a GAN has no likelihood


def test_vdm_calo_preset_trains(tmp_path):
    h5, data, run = tmp_path / "calo.h5", tmp_path / "calo", tmp_path / "run"
    # 300 showers: more than 256 distinct incident energies, so the manifest keeps only their
    # range (label_range), as for a real data set; the final sample grid spreads over it.
    run_pipeline("shards", "calo", "--num-samples", "300", "--out", str(h5))
    run_pipeline("shards", "hdf5", "--path", str(h5), "--x-key", "showers", "--label-key", "incident_energies",
                 "--x-shape", "45,16,9", "--add-channel-dim", "--out", str(data))
    run_pipeline("train", "--config", "configs/vdm_calo.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "vdm.channels=8", "vdm.emb_dim=16", "vdm.sample_steps=8", *FEW_STEPS)
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["vdm/bits_per_dim"]) for r in steps)
    meta = json.loads((data / "manifest.json").read_text())["meta"]
    assert meta["label_values"] is None and meta["label_range"][0] < meta["label_range"][1]
    assert list((run / "samples").glob("mid_slices-*.png"))  # the end-of-run grid, labels over the range
    # Samples come back from the log fraction of the incident energy as deposits in MeV:
    # non-negative and, summed over a shower, below the incident energy.
    run_pipeline("sample", "--run", str(run), "--num-samples", "4", "--num-steps", "4", "--label", "5000",
                 "--out", str(tmp_path / "showers.npy"))
    x = np.load(tmp_path / "showers.npy")
    assert x.shape == (4, 1, 45, 16, 9) and bool((x >= 0).all()) and bool((x.sum((1, 2, 3, 4)) < 5000).all())
