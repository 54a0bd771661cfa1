"""Reading reference shards, and the run-level composition on real (untrained) exported
models: keys, per-temperature results for conditional models, flags, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.data import sources
from pipeline.data.shards import write_shards
from pipeline.eval.reference import has_split, load_reference
from pipeline.eval.run import EvalOptions, evaluate_run, json_safe
from pipeline.objectives.registry import build_phases
from pipeline.train.export import write_export


def _shards(tmp_path, name, data, **kw):
    out = tmp_path / name
    write_shards(data, out, source=name.split("-")[0], params={"name": name}, samples_per_shard=100, seed=0, **kw)
    return out


def _run(tmp_path, name, meta, urls, **sections):
    d = {"run": {"dir": str(tmp_path / name)}, "data": {"train_urls": str(urls)}, "train": {"num_steps": 1}}
    d.update(sections)
    cfg = config_from_dict(d)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    (phase,) = [p for p in build_phases(cfg, meta) if p.ema]
    write_export(tmp_path / name, phase.module, cfg.to_dict(), meta, step=0)
    return tmp_path / name


@pytest.fixture(scope="module")
def ising_two_t(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ising2")
    data = sources.ising([2.0, 3.0], 8, 120, seed=0)
    return _shards(tmp, "ising-2T", data), data


def test_load_reference_reads_every_sample_with_metadata(ising_two_t):
    urls, data = ising_two_t
    ref = load_reference(str(urls), split="all")
    assert len(ref) == 240 and ref.x.shape == (240, 1, 8, 8)
    temps = ref.json_column("temperature")
    assert sorted(set(temps.tolist())) == [2.0, 3.0]
    # Every source lattice is there, as stored (match by source index).
    idx = np.array([d["index"] for d in ref.json])
    np.testing.assert_array_equal(ref.x, data.x[idx].astype(np.float32))
    val = load_reference(str(urls), split="validation")
    assert len(val) == 24 and has_split(str(urls), "validation")
    with pytest.raises(ValueError, match="split must be one of"):
        load_reference(str(urls), split="test")


def test_unconditional_vdm_run_keys_finite_and_flagged(tmp_path):
    urls = _shards(tmp_path, "ising-T3", sources.ising([3.0], 8, 200, seed=1))
    meta = load_reference(str(urls)).meta
    run = _run(tmp_path, "vdm", meta, urls, vdm={"num_timesteps": 6, "channels": 4, "data_kind": "spins"})
    r = evaluate_run(run, str(urls), EvalOptions(num_samples=64, elbo_num_samples=8, elbo_noise_samples=2))
    json.dumps(r, allow_nan=False)
    for k in ("energy_per_spin", "energy_exact", "abs_magnetisation", "magnetisation_exact", "w1_energy",
              "bits_per_spin", "entropy_bits_per_spin", "flags"):
        assert k in r, k
    for k in ("energy_per_spin", "energy_exact", "abs_magnetisation", "w1_energy", "bits_per_spin"):
        assert math.isfinite(r[k]), k
    assert r["temperatures"] == [3.0] and r["num_generated"] == 64 and r["elbo_num_samples"] == 8
    # An untrained VDM: noise, nothing like the physics, and far above the entropy.
    assert r["flags"] and r["gap_bits_per_spin"] > 0


def test_conditional_vdm_run_reports_per_temperature(tmp_path, ising_two_t):
    urls, _ = ising_two_t
    meta = load_reference(str(urls)).meta
    assert meta.label_kind == "continuous"
    run = _run(tmp_path, "cvdm", meta, urls, data={"train_urls": str(urls), "label_key": "temperature"},
               vdm={"num_timesteps": 4, "channels": 4, "data_kind": "spins"})
    r = evaluate_run(run, str(urls), EvalOptions(num_samples=16, elbo_num_samples=4, elbo_noise_samples=2))
    assert set(r["per_temperature"]) == {"2", "3"}
    lo, hi = r["per_temperature"]["2"], r["per_temperature"]["3"]
    assert lo["magnetisation_exact"] > 0.9 and hi["magnetisation_exact"] == 0.0  # across T_c
    assert lo["num_reference"] == 120 and hi["num_reference"] == 120
    assert r["energy_exact"] == pytest.approx((lo["energy_exact"] + hi["energy_exact"]) / 2)
    assert "bits_per_spin" in lo and "entropy_bits_per_spin" in hi
    assert all(f.startswith(("T=2:", "T=3:")) for f in r["flags"])


def test_gan_run_and_temperature_errors(tmp_path, ising_two_t):
    urls, _ = ising_two_t
    meta1 = load_reference(str(_shards(tmp_path, "ising-one", sources.ising([3.0], 8, 50, seed=2)))).meta
    run = _run(tmp_path, "gan", meta1, urls, objective="gan", gan={"channels": [8, 8], "latent_dim": 8})
    # An unconditional model against data that mixes temperatures: must choose one.
    with pytest.raises(ValueError, match="mixes temperatures"):
        evaluate_run(run, str(urls), EvalOptions(num_samples=8))
    with pytest.raises(ValueError, match="not in the reference data"):
        evaluate_run(run, str(urls), EvalOptions(num_samples=8, temperatures=[2.5]))
    r = evaluate_run(run, str(urls), EvalOptions(num_samples=32, temperatures=[3.0]))
    assert r["objective"] == "gan" and "bits_per_spin" not in r
    assert r["num_reference"] == 120 and r["num_reference_total"] == 240
    assert r["temperature"] == 3.0 and r["num_generated"] == 32
    other = _shards(tmp_path, "ising-L4", sources.ising([3.0], 4, 20, seed=3))
    with pytest.raises(ValueError, match="shape"):
        evaluate_run(run, str(other), EvalOptions(num_samples=8))
    with pytest.raises(ValueError, match="--num-samples"):
        evaluate_run(run, str(urls), EvalOptions(num_samples=1))


def test_json_safe_nonfinite_becomes_null():
    out = json_safe({"a": math.inf, "b": np.float32(1.5), "c": [np.int64(2), float("nan")], "d": np.bool_(True)})
    assert out == {"a": None, "b": 1.5, "c": [2, None], "d": True}
    json.dumps(out, allow_nan=False)


def test_gmm_vdm_run_reports_likelihood_coverage_and_entropy(tmp_path):
    data = sources.gmm(2, 3, 300, seed=4)
    urls = _shards(tmp_path, "gmm-2d", data)
    meta = load_reference(str(urls)).meta
    run = _run(tmp_path, "gvdm", meta, urls, vdm={"num_timesteps": 4, "mlp_hidden": 16, "mlp_layers": 2})
    r = evaluate_run(run, str(urls), EvalOptions(num_samples=200, elbo_num_samples=16, elbo_noise_samples=2))
    assert r["evaluation"] == "gmm" and r["num_modes"] == 3
    # True samples' mean log-likelihood, recomputed independently from the stored per-sample values.
    stored = np.array([d["log_likelihood"] for d in load_reference(str(urls)).json])
    assert r["reference_mean_log_likelihood"] == pytest.approx(stored.mean(), rel=1e-5)
    assert math.isfinite(r["bits_per_dim"]) and math.isfinite(r["entropy_bits_per_dim"])
    assert r["gap_bits_per_dim"] == pytest.approx(r["bits_per_dim"] - r["entropy_bits_per_dim"])
