"""Smoke test of `pipeline bench data` at a tiny size (with the loopback S3 server of
``--s3``): it runs and reports its keys."""

from __future__ import annotations

import json


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
