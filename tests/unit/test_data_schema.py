"""Samples against the manifest's schema (issue 15 items 11, 13): a misspelt data.label_key
names the keys that exist; a shard whose samples have another shape is named, by `pipeline
shards verify` in its default mode and by the stream's report of skipped samples."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as pipeline_main
from pipeline.config import ConfigError
from pipeline.data import shards
from pipeline.data.config import DataConfig
from pipeline.data.stream import build_stream


def _ising(out: Path) -> Path:
    assert pipeline_main(["shards", "ising", "--temperature", "2.5", "--size", "4", "--num-samples", "20",
                          "--samples-per-shard", "5", "--val-fraction", "0", "--out", str(out)]) == 0
    return out


def _rewrite_with_shape(directory: Path, name: str, shape: tuple[int, ...]) -> None:
    """Replace shard ``name`` by one with the same keys and json but x of ``shape``, and record
    its size and sha256 in the manifest, as a buggy writer would: size mode cannot tell."""
    import webdataset as wds

    path = directory / name
    with wds.WebDataset(str(path), shardshuffle=False) as ds:
        samples = [{"__key__": s["__key__"], "json": s["json"]} for s in ds]
    for s in samples:
        buf = io.BytesIO()
        np.save(buf, np.ones(shape, dtype=np.int8))
        s["npy"] = buf.getvalue()
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    m = json.loads((directory / shards.MANIFEST_NAME).read_text())
    for s in m["shards"]:
        if s["name"] == name:
            s["num_bytes"], s["sha256"] = path.stat().st_size, shards.sha256_file(path)
    (directory / shards.MANIFEST_NAME).write_text(json.dumps(m))


def test_misspelt_label_key_names_the_keys_that_exist(tmp_path):
    out = _ising(tmp_path / "s")
    with pytest.raises(ConfigError) as e:
        build_stream(DataConfig(train_urls=str(out), label_key="temprature"), rank=0, world_size=1, seed=0)
    msg = str(e.value)
    assert "data.label_key='temprature'" in msg and "'temperature'" in msg and "'index'" in msg
    s = build_stream(DataConfig(train_urls=str(out), label_key="temperature", batch_per_rank=4),
                     rank=0, world_size=1, seed=0)
    assert float(next(s)["label"][0]) == 2.5
    s.close()


def test_wrong_shape_is_named_by_verify_and_by_the_stream(tmp_path, capsys, caplog):
    out = _ising(tmp_path / "s")
    assert pipeline_main(["shards", "verify", str(out)]) == 0
    _rewrite_with_shape(out, "train-000001.tar", (1, 2, 2))
    assert shards.verify(out) == []  # sizes and sha256 match the manifest...
    assert shards.verify(out, checksum=True) == []
    capsys.readouterr()
    assert pipeline_main(["shards", "verify", str(out)]) == 1  # ...the schema does not
    printed = capsys.readouterr().out
    assert "train-000001.tar" in printed and "key npy: shape (1, 2, 2), the manifest says (1, 4, 4)" in printed
    assert "train-000000.tar" not in printed
    assert pipeline_main(["shards", "verify", str(out), "--schema-members", "0"]) == 0

    s = build_stream(DataConfig(train_urls=str(out), batch_per_rank=20), rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        next(s)
    s.close()
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "train-000001.tar" in report and "shape (1, 2, 2), the manifest says (1, 4, 4)" in report
    assert "undecodable or incomplete" not in report


def test_verify_names_missing_json_keys(tmp_path, capsys):
    out = _ising(tmp_path / "s")
    m = json.loads((out / shards.MANIFEST_NAME).read_text())
    m["schema"]["json"]["keys"].append("pressure")
    (out / shards.MANIFEST_NAME).write_text(json.dumps(m))
    problems = shards.verify(out, schema_members=2)
    assert problems and all("key json" in p and "'pressure'" in p for p in problems)


def test_decode_npy_batch_gathers_members_at_uneven_offsets():
    """The strided gather of tario.decode_npy_batch (members of one header found at offsets
    512-byte blocks apart but unevenly, between json members of varying length, taken in a
    permuted order) against np.load of each member."""
    import io
    import tarfile

    import numpy as np

    from pipeline.data import tario

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 8, 8)).astype(np.float16) for _ in range(12)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, a in enumerate(arrays):
            for name, data in ((f"{i:04d}.json", b"x" * int(rng.integers(0, 1500))), (f"{i:04d}.npy", None)):
                if data is None:
                    b = io.BytesIO()
                    np.save(b, a)
                    data = b.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    idx = tario.scan_tar(raw)
    want = rng.permutation(12)[:9]
    x, ok = tario.decode_npy_batch(raw, idx.offset["npy"][want], idx.size["npy"][want], (1, 8, 8))
    assert ok.all()
    for j, i in enumerate(want):
        assert np.array_equal(x[j], arrays[i].astype(np.float32))
    # A missing member (offset -1) first: the others land in their own rows.
    x, ok = tario.decode_npy_batch(raw, np.r_[-1, idx.offset["npy"][want]], np.r_[0, idx.size["npy"][want]], (1, 8, 8))
    assert not ok[0] and ok[1:].all() and not x[0].any()
    for j, i in enumerate(want):
        assert np.array_equal(x[j + 1], arrays[i].astype(np.float32))
