"""End to end on calorimeter showers: `pipeline shards calo` (a CaloChallenge-layout HDF5
file) -> `pipeline shards hdf5 --x-shape L,A,R --add-channel-dim` -> `pipeline train` of a
VDM conditioned on the incident energy, a few steps, through the CLI -> `pipeline evaluate`
(profiles and response against the analytic means). A small geometry
(8 x 4 x 4) keeps every spatial size even, so `vdm.architecture=auto` takes the 3D UNet
(45 x 16 x 9 has odd sizes and gets the MLP)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from pipeline.data.shards import meta_from_dict, read_manifest
from pipeline.models.unet import UNet
from pipeline.objectives.vdm.config import VDMConfig
from pipeline.objectives.vdm.denoiser import build_network
from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration


def test_calo_file_to_shards_to_vdm_training(tmp_path):
    h5, data, run = tmp_path / "calo.h5", tmp_path / "shards", tmp_path / "run"
    run_pipeline("shards", "calo", "--num-samples", "256", "--out", str(h5), "--geometry", "8,4,4", "--seed", "0")
    run_pipeline("shards", "hdf5", "--path", str(h5), "--x-key", "showers", "--label-key", "incident_energies",
                 "--x-shape", "8,4,4", "--add-channel-dim", "--out", str(data), "--samples-per-shard", "64")
    m = read_manifest(data)
    meta = meta_from_dict(m["meta"])
    assert meta.sample_shape == (1, 8, 4, 4) and meta.label_kind == "continuous" and meta.data_kind == "continuous"
    net = build_network(VDMConfig(architecture="auto"), meta)
    assert isinstance(net, UNet) and net.ndim == 3
    assert not isinstance(build_network(VDMConfig(architecture="auto"), meta_from_dict(
        {**m["meta"], "sample_shape": [1, 45, 16, 9]})), UNet)
    with h5py.File(h5) as f:
        total = f["showers"][()].sum()
    assert m["total_samples"] == 256 and total > 0

    run_pipeline("train", "--config", "configs/vdm_grf2d.yaml", f"run.dir={run}", f"data.train_urls={data}",
                 "data.label_key=incident_energies", "vdm.periodic=false", "vdm.architecture=auto",
                 # the grf2d preset as a plain 3D UNet (its 3 levels need sizes a multiple of 8; its skip makes a
                 # 4-step model too good for the classifier check below)
                 "vdm.unet_levels=1", "vdm.skip=none", "vdm.gamma_max=6",
                 "train.num_steps=4", "train.checkpoint_every_steps=4", "train.warmup_steps=0", "train.log_every_steps=1",
                 "vdm.channels=8", "vdm.emb_dim=16", "data.batch_per_rank=16", "data.num_workers=0",
                 "data.shuffle_buffer=64", "track.wandb=off", "track.progress_bar=false")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "vdm/bits_per_dim" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["vdm/bits_per_dim"]) and r["vdm/skipped"] == 0 for r in steps)
    assert (run / "checkpoints" / "step-00000004").is_dir()

    # `pipeline evaluate` finds the showers' record (the HDF5 file's attributes, copied into
    # the manifest) and compares the profiles with the analytic means, for the model and,
    # as the noise level, for the held-out showers, which must pass.
    assert m["info"]["hdf5"]["attrs"]["calo"]["geometry"]["num_layers"] == 8
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "32", "--num-steps", "4")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["evaluation"] == "calo" and result["num_showers"] == 32 and result["step"] == 4
    for key in ("longitudinal_max_rel_err", "radial_max_rel_err", "response", "response_analytic", "response_z"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert abs(result["response_z_data"]) < 4 and result["longitudinal_max_abs_z_data"] < 4.5
    # The classifier two-sample AUC on a test half (of the 32 generated and the held-out
    # showers, whichever is fewer): a 4-step model's showers are far from real ones, so the AUC
    # is far above 0.5 (its null standard error is about 0.1).
    half = result["classifier_num_test"] // 2
    assert 10 <= half <= 16 and result["classifier_num_train"] + 2 * half <= 64
    assert result["classifier_auc_null_stderr"] == pytest.approx(math.sqrt((2 * half + 1) / (12 * half * half)))
    assert result["classifier_auc"] > 0.5 + 3 * result["classifier_auc_null_stderr"]
    # --sampler reaches the showers: the same seed under DDIM draws other showers (the
    # evaluation once dropped the option and drew ancestral ones under DDIM's name).
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data), "--num-samples", "32", "--num-steps", "4",
                     "--sampler", "ddim")
    ddim = json.loads(r.stdout.strip().splitlines()[-1])
    assert ddim["sampling"]["sampler"] == "ddim" and ddim["response"] != result["response"]
