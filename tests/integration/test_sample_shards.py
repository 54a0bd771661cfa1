"""`pipeline sample --out DIR`: WebDataset shards of samples, on 1 and on 2 real processes
(`accelerate launch`, gloo), resumed after an interruption, usable as training data; and the
samplers' options through the CLI, with their errors (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from tests.conftest import REPO, accelerate_launch, run_pipeline, subprocess_env

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("sample_shards")]

TRAIN_TINY = ["train.num_steps=3", "train.checkpoint_every_steps=3", "train.warmup_steps=0", "vdm.channels=8",
              "data.batch_per_rank=16", "data.num_workers=0", "track.wandb=off", "track.progress_bar=false"]


@pytest.fixture(scope="module")
def vdm_run(ising_shards, tmp_path_factory):
    """A continuous-time VDM trained for 3 steps on the real 8x8 Ising shards (its export is all we need)."""
    run = tmp_path_factory.mktemp("runs") / "vdm"
    run_pipeline("train", "--config", "configs/quickstart.yaml", f"run.dir={run}",
                 f"data.train_urls={ising_shards}", "vdm.num_timesteps=0", *TRAIN_TINY)
    return run


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _spins(d) -> tuple[list[str], np.ndarray]:
    """Keys and arrays of every sample in a shard directory, in shard order."""
    import io

    keys, xs = [], []
    for e in _manifest(d)["shards"]:
        with tarfile.open(d / e["name"]) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".npy"):
                    keys.append(m.name.split(".")[0])
                    xs.append(np.load(io.BytesIO(tf.extractfile(m).read())))
    return keys, np.stack(xs)


SAMPLE = ["--num-samples", "45", "--samples-per-shard", "10", "--batch-size", "4", "--num-steps", "6", "--seed", "3"]


def test_one_and_two_processes_write_the_same_samples(vdm_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # DDIM with eta = 0.5 draws noise at every step: the samples depend on every draw.
    how = ["--sampler", "ddim", "--eta", "0.5"]
    r1 = run_pipeline("sample", "--run", str(vdm_run), "--out", str(one), *SAMPLE, *how)
    r2 = accelerate_launch(2, "sample", "--run", str(vdm_run), "--out", str(two), *SAMPLE, *how)
    assert "samples/s" in r1.stderr and "rank 1/2" in r2.stderr  # progress lines, from each rank
    m1, m2 = _manifest(one), _manifest(two)
    assert m1["total_samples"] == m2["total_samples"] == 45 and len(m1["shards"]) == 5
    keys1, x1 = _spins(one)
    keys2, x2 = _spins(two)
    assert keys1 == keys2 == [f"{i:08d}" for i in range(45)]  # global indices, in order
    np.testing.assert_array_equal(x1, x2)  # spins: equal to the last bit (the tars are byte-identical too)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert set(np.unique(x1)) <= {-1, 1} and x1.dtype == np.int8 and x1.shape == (45, 1, 8, 8)
    assert m1["params"]["sampler"] == {"sampler": "ddim", "eta": 0.5, "grid": "time", "num_steps": 6}
    # A shard set like any other: verified, and trained on.
    run_pipeline("shards", "verify", str(two), "--sha256", "--schema-members", "4")
    run_pipeline("train", "--config", "configs/quickstart.yaml", f"run.dir={tmp_path / 'retrain'}",
                 f"data.train_urls={two}", "vdm.num_timesteps=0", "train.num_steps=1",
                 "train.checkpoint_every_steps=1", "train.warmup_steps=0", "vdm.channels=8",
                 "data.batch_per_rank=8", "data.num_workers=0", "track.wandb=off", "track.progress_bar=false")
    # A different seed gives other samples (the comparison above has teeth).
    other = tmp_path / "other"
    run_pipeline("sample", "--run", str(vdm_run), "--out", str(other), *SAMPLE[:-1], "4", *how)
    assert not np.array_equal(_spins(other)[1], x1)


def test_an_interrupted_or_damaged_job_resumes_to_the_same_samples(vdm_run, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--run", str(vdm_run), "--num-samples", "120", "--samples-per-shard", "6", "--batch-size", "3",
            "--num-steps", "40", "--seed", "5"]
    run_pipeline("sample", *args, "--out", str(ref))
    # Killed (SIGKILL: no clean-up at all) once two shards are complete.
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "sample", *args, "--out", str(out)], cwd=REPO,
                         env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        while not (out / "train-000001.tar").is_file() and p.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it was killed; the test needs a longer one"
    r = run_pipeline("sample", *args, "--out", str(out))
    assert "were complete already" in r.stdout and " 0 were complete" not in r.stdout
    assert [s["sha256"] for s in _manifest(out)["shards"]] == [s["sha256"] for s in _manifest(ref)["shards"]]
    assert not list(out.glob(".partial-*")) and not (out / ".sampling.json").exists()
    # A complete set with its last shard deleted: that shard is drawn again, the same.
    (out / "train-000019.tar").unlink()
    r = run_pipeline("sample", *args, "--out", str(out))
    assert "1 shards drawn now, 19 were complete already" in r.stdout
    assert _manifest(out)["shards"] == _manifest(ref)["shards"]
    # Complete: nothing to do. Other parameters on the same directory: refused, nothing touched.
    assert "nothing to do" in run_pipeline("sample", *args, "--out", str(out)).stdout
    bad = run_pipeline("sample", *args[:-1], "6", "--out", str(out), check=False)
    assert bad.returncode == 2 and "other parameters" in bad.stderr
    assert _manifest(out)["shards"] == _manifest(ref)["shards"]


@pytest.mark.parametrize("extra,match", [
    (["--sampler", "euler"], "unknown sampler 'euler'; allowed: ancestral, ddim, dpm-solver"),
    (["--sampler", "ddim", "--eta", "1.5"], r"--eta must be in [0, 1]"),
    (["--sampler", "dpm-solver", "--eta", "0.3"], "--eta applies to --sampler ddim only"),
    (["--num-steps", "0"], "--num-steps must be >= 1 (or left out for the model's default), got 0"),
    (["--num-steps", "-2", "--sampler", "ddim"], "--num-steps must be >= 1 (or left out for the model's default), got -2"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
    (["--grid", "karras"], "unknown grid spacing 'karras'"),
])
def test_bad_sampler_options_exit_2_before_anything_is_written(vdm_run, tmp_path, extra, match):
    out = tmp_path / "never"
    r = run_pipeline("sample", "--run", str(vdm_run), "--num-samples", "4", "--out", str(out), *extra, check=False)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_each_sampler_through_the_cli_into_npy(vdm_run, tmp_path):
    for name in ("ancestral", "ddim", "dpm-solver"):
        out = tmp_path / f"{name}.npy"
        run_pipeline("sample", "--run", str(vdm_run), "--num-samples", "6", "--num-steps", "5", "--out", str(out),
                     "--sampler", name, "--grid", "logsnr")
        x = np.load(out)
        assert x.shape == (6, 1, 8, 8) and set(np.unique(x)) <= {-1.0, 1.0}
    bad = run_pipeline("sample", "--run", str(vdm_run), "--num-samples", "6", "--out", str(tmp_path / "no.npy"),
                       "--batch-size", "4", check=False)
    assert bad.returncode == 2 and "go with a directory --out" in bad.stderr and not (tmp_path / "no.npy").exists()


def test_sampler_options_on_a_gan_are_refused(ising_shards, tmp_path):
    run = tmp_path / "gan"
    # Unconditional (the test shards hold one temperature and no label), so no FiLM or matching per T.
    run_pipeline("train", "--config", "configs/gan_ising.yaml", f"run.dir={run}", f"data.train_urls={ising_shards}",
                 "train.num_steps=2", "train.checkpoint_every_steps=2", "train.warmup_steps=0",
                 "data.batch_per_rank=8", "data.num_workers=0", "track.wandb=off", "track.progress_bar=false",
                 "gan.conditional=false", "gan.g_film=false", "gan.g_observable_matching=0")
    for extra, match in [(["--sampler", "ddim"], "a GAN's generator samples in one forward pass"),
                         (["--eta", "0.5"], "a GAN's generator samples in one forward pass"),
                         (["--num-steps", "5"], "--num-steps applies to VDM samplers")]:
        out = tmp_path / "never.npy"
        r = run_pipeline("sample", "--run", str(run), "--num-samples", "4", "--out", str(out), *extra, check=False)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()


def test_bench_samplers_prints_a_row_per_cell_and_a_json_last_line(vdm_run, ising_shards):
    r = run_pipeline("bench", "samplers", "--run", str(vdm_run), "--data", str(ising_shards), "--steps", "4", "128",
                     "--samplers", "ancestral", "dpm-solver", "--num-samples", "16")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cells = [(row["sampler"], row["num_steps"]) for row in out["rows"]]
    assert cells == [("ancestral", 4), ("ancestral", 128), ("dpm-solver", 4), ("dpm-solver", 128)]
    for row in out["rows"]:
        assert row["samples_per_s"] > 0 and -2.0 <= row["energy_per_spin"] <= 2.0 and row["energy_stderr"] > 0
        assert "sigma_vs_reference" in row
    assert out["reference"]["num_steps"] == 128 and isinstance(out["target_met"], bool)
    # `pipeline evaluate` takes the same options
    r = run_pipeline("evaluate", "--run", str(vdm_run), "--data", str(ising_shards), "--num-samples", "16",
                     "--elbo-num-samples", "0", "--sampler", "ddim", "--eta", "0.2", "--num-steps", "5")
    assert json.loads(r.stdout.strip().splitlines()[-1])["num_generated"] == 16
    bad = run_pipeline("evaluate", "--run", str(vdm_run), "--data", str(ising_shards), "--sampler", "heun",
                       check=False)
    assert bad.returncode == 2 and "allowed: ancestral, ddim, dpm-solver" in bad.stderr


def test_evaluate_a_sample_set_on_disk(vdm_run, ising_shards, tmp_path):
    out = tmp_path / "set"
    run_pipeline("sample", "--run", str(vdm_run), "--out", str(out), "--num-samples", "30", "--samples-per-shard",
                 "8", "--num-steps", "4")
    r = run_pipeline("evaluate", "--samples", str(out), "--data", str(ising_shards))
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["num_samples"] == 30 and res["max_samples_in_memory"] == 8 and res["temperature"] == 3.0
    assert res["energy_exact_finite"] < 0 and res["w1_energy"] >= 0
    both = run_pipeline("evaluate", "--samples", str(out), "--run", str(vdm_run), "--data", str(ising_shards),
                        check=False)
    assert both.returncode == 2 and "exactly one of --run" in both.stderr
