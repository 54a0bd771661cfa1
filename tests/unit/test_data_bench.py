"""Smoke tests of `pipeline bench data` at a tiny size (with the loopback S3 server of
``--s3``), and of its ``--scale`` variant: they run and report their keys; the scale
bench's loaders read the samples they should (counted against the shards' layout)."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest


def test_bench_data_reports_json(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = main(["bench", "data", "--work-dir", str(tmp_path), "--size", "4", "--num-samples", "100",
               "--batch-size", "8", "--num-batches", "3", "--workers", "1", "--train-steps", "2",
               "--rss-samples", "256", "--s3"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    for key in ("samples_per_s", "hf_samples_per_s", "ratio_vs_hf", "ratio_vs_train_step", "peak_rss_mb",
                "s3_samples_per_s", "s3_ratio_vs_local"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert set(out["datasets"]) == {"ising", "digits"}
    assert set(out["peak_rss_mb_by_dataset_size"]) == {"256", "1024"}
    assert out["rss_growth_ratio"] == out["peak_rss_mb_by_dataset_size"]["1024"] / out["peak_rss_mb_by_dataset_size"]["256"]
    assert out["ratio_vs_hf"] == out["samples_per_s"] / out["hf_samples_per_s"]
    assert out["s3_ratio_vs_local"] == out["s3_samples_per_s"] / out["samples_per_s"]
    # The real training step of the quickstart preset, timed by its own loop.
    step = out["train_step"]
    assert step["preset"] == "configs/quickstart.yaml" and step["num_steps"] == 2
    assert out["ratio_vs_train_step"] == out["samples_per_s"] / step["samples_per_s"]


@pytest.mark.slow
@pytest.mark.integration
def test_bench_data_scale_reports_json(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    n, shards, batch, ranks = 2000, 8, 64, 2
    rc = main(["bench", "data", "--scale", "--work-dir", str(tmp_path), "--scale-samples", str(n),
               "--scale-shards", str(shards), "--scale-shuffle-buffer", "200", "--scale-s3-shards", "2",
               "--scale-train-steps", "0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("samples_per_s", "mb_per_s", "webdataset_samples_per_s", "ratio_vs_webdataset", "hf_samples_per_s",
                "ratio_vs_hf", "s3_samples_per_s", "s3_ratio_vs_local", "peak_rss_mb", "rss_growth_ratio",
                "worker_peak_rss_mb", "worker_rss_bound_mb"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, key
    assert out["ratio_vs_webdataset"] == out["samples_per_s"] / out["webdataset_samples_per_s"]
    assert out["rss_growth_ratio"] == out["peak_rss_mb"] / out["peak_rss_mb_quarter"]
    # Every tar member is a 512-byte header and the .npy (128-byte header + 64*64*2 bytes)
    # padded to 512-byte blocks; every tar ends with two zero blocks.
    assert out["data_bytes"] == n * (512 + math.ceil((128 + 64 * 64 * 2) / 512) * 512) + shards * 1024
    # Shards hold n / shards samples each; the first quarter (2 shards) is what HF streams.
    per_shard = n // shards
    counts = out["counts"]
    assert counts["webdataset"] == n and counts["hf"] == 2 * per_shard == counts["quarter"]
    # Ours: every rank the same whole number of batches of an epoch (the rest, < ranks x batch, not drawn).
    assert counts["ours"] == n - n % (ranks * batch) == out["num_samples"]
    assert counts["ours_quarter"] == 2 * per_shard - 2 * per_shard % (ranks * batch) == counts["s3"]
    assert out["subsets"] == {"hf_shards": 2, "s3_shards": 2, "rss_small_shards": 2}


def test_scale_shards_read_by_tarfile(tmp_path):
    """The vectorised tar writer against the standard library's reader and np.load."""
    from pipeline.bench.data_scale import END, shard_rows, smooth_fields

    x = smooth_fields(np.random.default_rng(0), 5)
    path = tmp_path / "s.tar"
    path.write_bytes(shard_rows(123, x).tobytes() + END)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{i:08d}.npy" for i in range(123, 128)]
        for m, xi in zip(members, x):
            assert m.isfile() and m.mtime == 0
            a = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
            assert a.dtype == np.float16 and np.array_equal(a, xi)


@pytest.mark.parametrize("args, says", [
    (["--scale-samples", "0"], "--scale-samples must be >= 1"),
    (["--scale-samples", "4", "--scale-shards", "8"], "exceeds --scale-samples"),
    (["--scale-samples", "1000", "--scale-shards", "8", "--scale-s3-shards", "1"], "leaves 125 samples"),
    (["--scale-train-steps", "-1"], "--scale-train-steps must be >= 0"),
])
def test_bench_data_scale_refuses_sizes_it_cannot_stream(tmp_path, capsys, args, says):
    """Exit 2 with one line before anything is written (a rank needs 2 batches of 64 in every epoch streamed)."""
    from pipeline.cli import main

    assert main(["bench", "data", "--scale", "--work-dir", str(tmp_path / "w"), *args]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
