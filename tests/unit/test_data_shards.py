"""Shard writing: every source round-trips, manifests are complete, writes are idempotent."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as pipeline_main
from pipeline.data import shards, sources
from pipeline.data.meta import DataMeta


def read_all(directory: Path, split: str | None = None) -> dict[str, dict]:
    """Every sample of a shard set, read with the standard library's tarfile (independent
    of the pipeline's own reader): key -> {"npy": array, "json": dict, "cls": int}."""
    m = shards.read_manifest(directory)
    out: dict[str, dict] = {}
    for s in m["shards"]:
        if split is not None and s["split"] != split:
            continue
        count = 0
        with tarfile.open(directory / s["name"]) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                d = out.setdefault(key, {"split": s["split"]})
                if ext == "npy":
                    d["npy"] = np.load(io.BytesIO(data), allow_pickle=False)
                    count += 1
                elif ext == "json":
                    d["json"] = json.loads(data)
                elif ext == "cls":
                    d["cls"] = int(data)
        assert count == s["num_samples"], s
    return out


def run(*argv: str) -> int:
    return pipeline_main(["shards", *map(str, argv)])


def test_ising_round_trip_and_manifest(tmp_path):
    from pipeline.physics.ising import sample_ising

    out = tmp_path / "ising"
    rc = run("ising", "--temperature", 2.0, 3.0, "--size", 6, "--num-samples", 50, "--out", out,
             "--samples-per-shard", 16, "--val-fraction", 0.2, "--seed", 7)
    assert rc == 0
    m = shards.read_manifest(out)
    assert m["source"] == "ising" and m["total_samples"] == 100
    assert m["splits"]["validation"]["num_samples"] == 20 and m["splits"]["train"]["num_samples"] == 80
    assert shards.meta_from_dict(m["meta"]) == DataMeta(
        sample_shape=(1, 6, 6), data_kind="spins", label_kind="continuous", label_values=(2.0, 3.0))
    assert m["params"]["temperature"] == [2.0, 3.0] and m["params"]["seed"] == 7
    assert all(s["num_samples"] <= 16 for s in m["shards"])
    for s in m["shards"]:
        assert shards.sha256_file(out / s["name"]) == s["sha256"]
        assert (out / s["name"]).stat().st_size == s["num_bytes"]

    samples = read_all(out)
    assert len(samples) == 100
    # Independent reference: the sampler called directly with the documented seeds.
    expected = {t: sample_ising(t, 6, 50, seed=seed) for t, seed in zip((2.0, 3.0), m["info"]["seeds"])}
    for key, d in samples.items():
        meta = d["json"]
        assert int(key) == meta["index"]
        assert d["npy"].dtype == np.int8 and d["npy"].shape == (1, 6, 6)
        t = meta["temperature"]
        within = meta["index"] - (0 if t == 2.0 else 50)
        np.testing.assert_array_equal(d["npy"][0], expected[t][within])
        assert meta["size"] == 6 and "cls" not in d


def test_single_temperature_has_no_label(tmp_path):
    assert run("ising", "--temperature", 2.27, "--size", 4, "--num-samples", 10, "--out", tmp_path / "a") == 0
    meta = shards.meta_from_dict(shards.read_manifest(tmp_path / "a")["meta"])
    assert meta.label_kind == "none" and meta.label_values is None


def test_digits_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    assert run("digits", "--out", out, "--samples-per-shard", 500) == 0
    m = shards.read_manifest(out)
    assert shards.meta_from_dict(m["meta"]) == DataMeta(
        sample_shape=(1, 8, 8), data_kind="levels", num_levels=17, label_kind="class", num_classes=10)
    ref = load_digits()
    samples = read_all(out)
    assert len(samples) == len(ref.images) == m["total_samples"]
    for key, d in samples.items():
        i = int(key)
        np.testing.assert_array_equal(d["npy"][0], ref.images[i])
        assert d["cls"] == ref.target[i]


def test_gmm_mean_log_likelihood_matches_scipy(tmp_path):
    from scipy.stats import multivariate_normal

    out = tmp_path / "gmm"
    assert run("gmm", "--dim", 3, "--num-components", 4, "--num-samples", 400, "--out", out) == 0
    m = shards.read_manifest(out)
    g = m["info"]["gmm"]
    samples = read_all(out)
    x = np.stack([samples[k]["npy"] for k in sorted(samples)])
    assert x.shape == (400, 3) and x.dtype == np.float32
    # Brute-force reference: sum of weighted scipy densities.
    dens = sum(w * multivariate_normal(mu, cov).pdf(x.astype(np.float64))
               for w, mu, cov in zip(g["weights"], g["means"], g["covariances"]))
    np.testing.assert_allclose(m["info"]["mean_log_likelihood"], np.log(dens).mean(), rtol=1e-9)
    ll = np.array([samples[k]["json"]["log_likelihood"] for k in sorted(samples)])
    np.testing.assert_allclose(ll, np.log(dens), rtol=1e-9)
    assert shards.meta_from_dict(m["meta"]).data_kind == "continuous"


def test_npy_source_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(30, 5, 5)).astype(np.uint8)
    y = rng.integers(0, 3, size=30)
    np.savez(tmp_path / "d.npz", images=x, other=x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "npy"
    rc = run("npy", "--x", tmp_path / "d.npz", "--x-key", "images", "--labels", tmp_path / "y.npy",
             "--add-channel-dim", "--out", out, "--val-fraction", 0)
    assert rc == 0
    meta = shards.meta_from_dict(shards.read_manifest(out)["meta"])
    assert meta == DataMeta(sample_shape=(1, 5, 5), data_kind="levels", num_levels=int(x.max()) + 1,
                            label_kind="class", num_classes=int(y.max()) + 1)
    samples = read_all(out)
    for key, d in samples.items():
        np.testing.assert_array_equal(d["npy"][0], x[int(key)])
        assert d["cls"] == y[int(key)]
    # Ambiguous .npz without --x-key, and a continuous label stored in json.
    assert run("npy", "--x", tmp_path / "d.npz", "--out", tmp_path / "bad") == 2
    np.save(tmp_path / "t.npy", rng.normal(size=30))
    assert run("npy", "--x", tmp_path / "d.npz", "--x-key", "images", "--labels", tmp_path / "t.npy",
               "--out", tmp_path / "cont") == 0
    assert "label" in read_all(tmp_path / "cont")["00000000"]["json"]


def test_hf_source_save_to_disk_and_parquet(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 2, 3)).astype(np.float32)
    temps = rng.choice([1.5, 2.5], size=20)
    ds = datasets.Dataset.from_dict({"field": x.tolist(), "t": temps.tolist()})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for i, path in enumerate([tmp_path / "saved", tmp_path / "d.parquet"]):
        out = tmp_path / f"hf{i}"
        rc = run("hf", "--path", path, "--x-column", "field", "--label-column", "t", "--out", out)
        assert rc == 0
        meta = shards.meta_from_dict(shards.read_manifest(out)["meta"])
        assert meta == DataMeta(sample_shape=(2, 3), data_kind="continuous", label_kind="continuous",
                                label_values=(1.5, 2.5))
        for key, d in read_all(out).items():
            np.testing.assert_array_equal(d["npy"], x[int(key)])
            assert d["json"]["label"] == temps[int(key)]
    assert run("hf", "--path", tmp_path / "saved", "--x-column", "nope", "--out", tmp_path / "x") == 2


def test_idempotent_deterministic_and_atomic(tmp_path, capsys):
    args = ["ising", "--temperature", 2.5, "--size", 4, "--num-samples", 40, "--samples-per-shard", 8]
    assert run(*args, "--out", tmp_path / "a") == 0
    assert run(*args, "--out", tmp_path / "b", "--workers", 2) == 0
    ma, mb = shards.read_manifest(tmp_path / "a"), shards.read_manifest(tmp_path / "b")
    # Parallel writing gives byte-identical shards.
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    capsys.readouterr()
    assert run(*args, "--out", tmp_path / "a") == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before
    # Different parameters into the same directory: refused, then allowed with --overwrite,
    # and the old shards that the new set does not use are gone.
    small = ["ising", "--temperature", 2.5, "--size", 4, "--num-samples", 10, "--samples-per-shard", 8]
    assert run(*small, "--out", tmp_path / "a") == 2
    assert run(*small, "--out", tmp_path / "a", "--overwrite") == 0
    m = shards.read_manifest(tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([s["name"] for s in m["shards"]] + ["manifest.json"])  # no staging left


def test_bad_input_exit_code_2(tmp_path, capsys):
    assert run("ising", "--temperature", 0, "--size", 4, "--num-samples", 4, "--out", tmp_path / "x") == 2
    assert "temperature" in capsys.readouterr().err
    assert run("ising", "--temperature", 2, "--size", 4, "--num-samples", 4, "--val-fraction", 0.5,
               "--out", tmp_path / "y", "--samples-per-shard", 1) == 0
    assert run("npy", "--x", tmp_path / "missing.npy", "--out", tmp_path / "z") == 2
    with pytest.raises(SystemExit) as e:  # argparse: not a number
        run("ising", "--temperature", 2, "--size", "big", "--num-samples", 4, "--out", tmp_path / "w")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run("ising", "--temperature", 2, "--size", 4, "--num-samples", 4, "--val-fraction", 1.0,
            "--out", tmp_path / "w")
    assert e.value.code == 2


def test_max_shard_bytes_splits_shards(tmp_path):
    limit = 2000
    assert run("ising", "--temperature", 2.5, "--size", 4, "--num-samples", 30, "--val-fraction", 0,
               "--max-shard-bytes", limit, "--out", tmp_path / "a") == 0
    m = shards.read_manifest(tmp_path / "a")
    assert len(m["shards"]) > 1 and sum(s["num_samples"] for s in m["shards"]) == 30
    # ShardWriter semantics: a shard is closed once its payload (member bytes) reaches the
    # limit, so every shard but the last reached it, and none did before its last sample.
    for i, s in enumerate(m["shards"]):
        with tarfile.open(tmp_path / "a" / s["name"]) as tf:
            sizes = [t.size for t in tf.getmembers()]
        per_sample = [a + b for a, b in zip(sizes[0::2], sizes[1::2])]  # json + npy
        assert len(per_sample) == s["num_samples"]
        assert sum(per_sample[:-1]) < limit
        if i < len(m["shards"]) - 1:
            assert sum(per_sample) >= limit


def test_verify_detects_modified_and_missing_shard(tmp_path, capsys):
    out = tmp_path / "s"
    assert run("ising", "--temperature", 2.5, "--size", 4, "--num-samples", 20, "--samples-per-shard", 5,
               "--out", out) == 0
    assert shards.verify(out, checksum=True) == []
    first = out / "train-000000.tar"
    data = bytearray(first.read_bytes())
    # Flip one byte of a member's data: same size, so only the checksum can tell.
    pos = data.index(b"\x93NUMPY") + 200
    data[pos] ^= 0xFF
    first.write_bytes(bytes(data))
    assert shards.verify(out) == []
    problems = shards.verify(out, checksum=True)
    assert len(problems) == 1 and "train-000000.tar" in problems[0]
    assert pipeline_main(["shards", "verify", str(out), "--sha256"]) == 1
    (out / "train-000001.tar").unlink()
    assert any("missing" in p and "train-000001.tar" in p for p in shards.verify(out))


def test_sources_reject_bad_values():
    with pytest.raises(ValueError, match="distinct"):
        sources.ising([2.0, 2.0], 4, 4, seed=0)
    with pytest.raises(ValueError, match="spins"):
        sources._from_arrays(np.zeros((3, 2)), None, add_channel_dim=False, data_kind="spins",
                             num_levels=None, label_kind=None, what="npy")
    with pytest.raises(ValueError, match="num-levels"):
        sources._from_arrays(np.full((3, 2), 5), None, add_channel_dim=False, data_kind="levels",
                             num_levels=3, label_kind=None, what="npy")
