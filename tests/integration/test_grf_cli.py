"""End to end on Gaussian random fields: `pipeline shards grf` -> `pipeline train` (the
vdm_grf2d preset, shrunk to a few steps on 16x16 fields) -> `pipeline evaluate`; the last
stdout line carries the likelihood and spectrum keys, finite and consistent with the exact
field rebuilt from the manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.grf import elbo_gap_nats, field_power
from pipeline.eval.reference import load_reference
from pipeline.physics.grf import grf_from_info
from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration


def test_grf_shards_train_evaluate(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    run_pipeline("shards", "grf", "--ndim", "2", "--size", "16", "--spectral-index", "-2", "--amplitude", "1.8",
                 "--num-samples", "256", "--out", str(data), "--seed", "0")
    run_pipeline("train", "--config", "configs/vdm_grf2d.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "train.num_steps=4", "train.checkpoint_every_steps=4", "train.warmup_steps=0", "vdm.channels=8",
                 "vdm.emb_dim=16", "data.batch_per_rank=16", "data.num_workers=0", "data.shuffle_buffer=64",
                 "track.wandb=off", "track.progress_bar=false")
    out = tmp_path / "eval.json"
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "64", "--num-steps", "8",
                     "--seed", "1", "--elbo-num-samples", "16", "--elbo-noise-samples", "2", "--out", str(out))
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["evaluation"] == "grf" and result["step"] == 4 and result["num_generated"] == 64
    for key in ("bits_per_dim", "stderr", "nats_per_dim", "nll_exact_nats_per_dim", "power_spectrum_max_rel_err",
                "power_spectrum_chi2", "w1_one_point", "ks_one_point", "recon_bpd", "prior_bpd", "diffusion_bpd",
                "gap_nats_per_dim", "elbo_floor_gap_nats_per_dim", "power_spectrum_max_rel_err_reference",
                "minkowski_chi2", "minkowski_max_abs_z", "minkowski_reference_chi2", "minkowski_v2_max_abs_z"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["stderr"] > 0 and result["power_spectrum_chi2"] > 0 and result["power_spectrum_max_rel_err"] > 0
    assert result["nats_per_dim"] == pytest.approx(result["bits_per_dim"] * math.log(2), rel=1e-12)
    assert result["recon_bpd"] + result["prior_bpd"] + result["diffusion_bpd"] == pytest.approx(result["bits_per_dim"])
    assert len(result["power_spectrum"]["ratio"]) == result["power_spectrum_num_bins"]
    assert np.asarray(result["minkowski"]["exact"]).shape == (3, len(result["minkowski"]["nu"]))

    # The exact NLL of the same held-out fields, from the manifest's record of the field and,
    # independently, from the log-likelihoods `pipeline shards` stored with each sample.
    held = load_reference(str(data), split="validation")
    n = result["elbo_num_samples"]
    assert n == 16
    field = grf_from_info(held.manifest["info"]["grf"])
    num_dims = field.num_sites * field.channels
    nll = -field.log_density(held.x[:n]).mean() / num_dims
    assert result["nll_exact_nats_per_dim"] == pytest.approx(nll, rel=1e-12)
    stored = np.asarray([d["log_likelihood"] for d in held.json[:n]])
    assert result["nll_exact_nats_per_dim"] == pytest.approx(-stored.mean() / num_dims, rel=1e-9)
    floor = elbo_gap_nats(field_power(field), -10.0, 10.0)["gap"] / num_dims  # the preset's endpoints
    assert result["elbo_floor_gap_nats_per_dim"] == pytest.approx(floor, rel=1e-5)
    # The preset's spectral skip (the Wiener filter with the spectrum of the 64 fields read so
    # far) makes even a 4-step model close to the field: -ELBO 1.02x the exact NLL here, where
    # the per-site Gaussian skip gives 1.42x (same command with vdm.skip=gaussian); 1.15 leaves
    # 4 standard errors of this 16-field estimate. Not flagged as below the bound either.
    assert result["gap_nats_per_dim"] < 0.15 * result["nll_exact_nats_per_dim"]
    assert result["gap_nats_per_dim"] > -3 * result["gap_nats_per_dim_stderr"]
    assert not any("below the exact NLL" in f for f in result["flags"])


def test_vdm_grf3d_preset_trains_and_evaluates(tmp_path):
    """configs/vdm_grf3d.yaml on shrunk 8^3 fields: the 3D UNet trains 3 steps through the CLI
    and `pipeline evaluate` reports the 3D spectrum (no Minkowski functionals: 2D maps only)."""
    data, run = tmp_path / "data", tmp_path / "run"
    run_pipeline("shards", "grf", "--ndim", "3", "--size", "8", "--spectral-index", "-2", "--amplitude", "5.5",
                 "--num-samples", "128", "--out", str(data), "--seed", "0")
    run_pipeline("train", "--config", "configs/vdm_grf3d.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "train.num_steps=3", "train.checkpoint_every_steps=3", "train.warmup_steps=0",
                 "train.log_every_steps=1", "vdm.channels=8", "vdm.emb_dim=16", "data.batch_per_rank=8",
                 "data.num_workers=0", "data.shuffle_buffer=32", "track.wandb=off", "track.progress_bar=false")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "vdm/bits_per_dim" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["vdm/bits_per_dim"]) for r in steps)
    assert list((run / "samples").glob("mid_slices-*.png"))  # 3D samples are drawn by their middle slices
    out, png = tmp_path / "s.npy", tmp_path / "s.png"
    r = run_pipeline("sample", "--run", str(run), "--num-samples", "4", "--num-steps", "2", "--out", str(out),
                     "--png", str(png))
    assert f"middle slices: {png}" in r.stdout
    x = np.load(out)
    grid = np.asarray(Image.open(png))[:, :, 0]  # 2 x 2 tiles of 8 x 8 sites, 1-pixel gray borders
    assert x.shape == (4, 1, 8, 8, 8) and grid.shape == (19, 19)
    mid = x[3, 0, 4]  # the 4th sample's middle slice, min-max mapped over the drawn slices
    lo, hi = x[:, 0, 4].min(), x[:, 0, 4].max()
    assert np.array_equal(grid[10:18, 10:18], np.round((mid - lo) / (hi - lo) * 255).astype(np.uint8))
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "16", "--num-steps", "4",
                     "--elbo-num-samples", "4", "--elbo-noise-samples", "2")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["evaluation"] == "grf" and result["field"]["ndim"] == 3 and result["num_generated"] == 16
    for key in ("power_spectrum_chi2", "power_spectrum_max_rel_err", "w1_one_point", "nats_per_dim",
                "nll_exact_nats_per_dim"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert "minkowski_chi2" not in result
    assert result["nats_per_dim"] > result["nll_exact_nats_per_dim"]  # 3 steps: far above the bound
