"""Our shards are plain WebDataset: readable by webdataset itself and by HF datasets."""

from __future__ import annotations


import numpy as np
import pytest

from pipeline.data import shards, sources


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "s"
    shards.write_shards(sources.digits(), out, source="digits", params={}, samples_per_shard=400,
                        val_fraction=0.1, seed=0)
    return out


def _train_files(d):
    return [str(d / s["name"]) for s in shards.read_manifest(d)["shards"] if s["split"] == "train"]


def test_plain_webdataset_reads_every_sample(digits_dir):
    import webdataset as wds
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = wds.WebDataset(_train_files(digits_dir), shardshuffle=False).decode()
    seen = set()
    for s in ds:
        i = s["json"]["index"]
        np.testing.assert_array_equal(s["npy"][0], ref.images[i])
        assert s["cls"] == ref.target[i] and s["__key__"] == f"{i:08d}"
        seen.add(i)
    assert len(seen) == shards.read_manifest(digits_dir)["splits"]["train"]["num_samples"]


def test_hf_datasets_webdataset_loader_reads_every_sample(digits_dir, tmp_path, monkeypatch):
    import datasets
    from sklearn.datasets import load_digits

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref = load_digits()
    ds = datasets.load_dataset("webdataset", data_files={"train": _train_files(digits_dir)}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == shards.read_manifest(digits_dir)["splits"]["train"]["num_samples"]
    for row in ds:
        i = row["json"]["index"]
        np.testing.assert_array_equal(np.asarray(row["npy"])[0], ref.images[i])
        assert int(row["cls"]) == ref.target[i]
