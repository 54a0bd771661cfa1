"""The batch stream: exactly-once per epoch across ranks x workers, resume, corrupt input
(world-size changes and the global order across layouts: test_data_elastic.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import shards, sources
from pipeline.data.config import DataConfig
from pipeline.data.stream import Decoder, build_stream, read_meta

NUM_PER_T = 35  # x 3 temperatures = 105 samples: odd, so 2 ranks' batches straddle epochs


def write_ising(out: Path, *, per_shard: int = 10, val_fraction: float = 0.0) -> Path:
    data = sources.ising([2.0, 2.5, 3.0], 4, NUM_PER_T, seed=1)
    shards.write_shards(data, out, source="ising", params={"test": 1}, samples_per_shard=per_shard,
                        val_fraction=val_fraction, seed=1)
    return out


@pytest.fixture(scope="module")
def ising_dir(tmp_path_factory) -> Path:
    return write_ising(tmp_path_factory.mktemp("ising") / "s")


def cfg_for(urls, **kw) -> DataConfig:
    kw.setdefault("batch_per_rank", 8)
    kw.setdefault("shuffle_buffer", 20)
    kw.setdefault("label_key", "index")
    return DataConfig(train_urls=str(urls), **kw)


def take(stream, num_batches: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(num_batches)]


def indices(batches) -> np.ndarray:
    return torch.cat([b["label"] for b in batches]).long().numpy()


def test_exactly_once_per_epoch_two_ranks_two_workers(ising_dir):
    n = 3 * NUM_PER_T  # odd: the global order drops nothing, a batch may straddle epochs
    cfg = cfg_for(ising_dir, num_workers=2)
    streams = [build_stream(cfg, rank=rank, world_size=2, seed=11) for rank in (0, 1)]
    assert streams[0].samples_per_epoch == n
    flat, positions = [], []
    for _ in range(-(-3 * n // 16) + 1):  # a bit over 3 epochs, micro batches rank-minor
        for s in streams:
            b = next(s)
            flat.append(indices([b]))
            positions += b["index"].tolist()
    for s in streams:
        s.close()
    flat = np.concatenate(flat)
    assert positions == list(range(len(positions)))  # rank r's k-th batch: k*W*B + r*B + [0, B)
    epochs = [flat[e * n:(e + 1) * n] for e in range(3)]
    for e, got in enumerate(epochs):
        assert sorted(got) == list(range(n)), f"epoch {e}: a sample repeats or is missing"
    # Each epoch is a fresh shuffle (not the same order again).
    assert not np.array_equal(epochs[0], epochs[1])
    # The order does not depend on the number of workers.
    s0 = build_stream(cfg_for(ising_dir, num_workers=0), rank=1, world_size=2, seed=11)
    rank1 = np.concatenate([flat[k * 16 + 8:k * 16 + 16] for k in range(len(flat) // 16)])
    assert np.array_equal(indices(take(s0, len(rank1) // 8)), rank1)
    s0.close()


def test_batches_content_and_types(ising_dir):
    s = build_stream(cfg_for(ising_dir, label_key="temperature"), rank=0, world_size=1, seed=0)
    b = next(s)
    assert b["x"].dtype == torch.float32 and b["x"].shape == (8, 1, 4, 4)
    assert set(torch.unique(b["x"]).tolist()) <= {-1.0, 1.0}
    assert b["label"].dtype == torch.float32 and set(b["label"].tolist()) <= {2.0, 2.5, 3.0}
    s.close()
    # Stored values come back exactly: compare with the writer's arrays through json index.
    data = sources.ising([2.0, 2.5, 3.0], 4, NUM_PER_T, seed=1)
    s = build_stream(cfg_for(ising_dir), rank=0, world_size=1, seed=0)
    for b in take(s, 5):
        np.testing.assert_array_equal(b["x"].numpy(), data.x[b["label"].long().numpy()])
    s.close()
    s = build_stream(cfg_for(ising_dir, label_key=None), rank=0, world_size=1, seed=0)
    assert set(next(s)) == {"x", "index"}
    s.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted(ising_dir, num_workers):
    cfg = cfg_for(ising_dir, num_workers=num_workers, batch_per_rank=7)
    full = build_stream(cfg, rank=1, world_size=2, seed=5)
    ref = take(full, 25)  # 175 of the rank's samples: crosses epoch boundaries (105 per epoch)
    full.close()
    for k in (0, 3, 8, 16):
        s = build_stream(cfg, rank=1, world_size=2, seed=5)
        take(s, k)
        state = json.loads(json.dumps(s.state_dict()))  # JSON-serialisable
        s.close()
        resumed = build_stream(cfg, rank=1, world_size=2, seed=5)
        resumed.load_state_dict(state)
        for a, b in zip(take(resumed, 25 - k), ref[k:]):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
            assert torch.equal(a["index"], b["index"])
        resumed.close()


def test_resume_does_not_replay(ising_dir, monkeypatch):
    cfg = cfg_for(ising_dir, shuffle_buffer=10)
    s = build_stream(cfg, rank=0, world_size=1, seed=2)
    take(s, 40)  # 320 samples = 3 epochs and a bit
    state = s.state_dict()
    s.close()
    calls = []
    real = Decoder.window
    monkeypatch.setattr(Decoder, "window", lambda self, e, w, lay: calls.append((e, w)) or real(self, e, w, lay))
    resumed = build_stream(cfg, rank=0, world_size=1, seed=2)
    resumed.load_state_dict(state)
    next(resumed)
    assert len(calls) <= 2 and calls[0][0] == 3, calls  # starts in epoch 3, at most 2 windows
    resumed.close()


def test_windows_bound_memory(ising_dir):
    s = build_stream(cfg_for(ising_dir, shuffle_buffer=25), rank=0, world_size=2, seed=0)
    max_shard = max(s.plan.num_samples)
    for epoch in range(3):
        wins = s.plan.windows(epoch)
        sizes = [sum(len(p) for p in w) for w in wins]
        assert sum(sizes) == s.samples_per_epoch == 3 * NUM_PER_T  # global windows
        assert all(sz < 25 + max_shard for sz in sizes)
    s.close()


def test_url_forms_give_the_same_samples(ising_dir):
    m = shards.read_manifest(ising_dir)
    k = len(m["shards"])
    brace = f"{ising_dir}/train-{{000000..{k - 1:06d}}}.tar"
    forms = [ising_dir, ising_dir / "manifest.json", brace, f"pipe:cat {brace}"]
    for urls in forms:
        s = build_stream(cfg_for(urls, batch_per_rank=5), rank=0, world_size=1, seed=0)
        got = indices(take(s, 21))  # 105 samples: one epoch
        s.close()
        assert sorted(got) == list(range(105)), urls
    single = build_stream(cfg_for(ising_dir / "train-000003.tar", batch_per_rank=5), rank=0, world_size=1, seed=0)
    assert len(set(indices(take(single, 2)))) == 10
    single.close()


def test_validation_split_and_meta(tmp_path):
    d = write_ising(tmp_path / "s", val_fraction=0.2)
    assert read_meta(str(d)).label_values == (2.0, 2.5, 3.0)
    s = build_stream(cfg_for(d, batch_per_rank=3), rank=0, world_size=1, seed=0, split="validation")
    got = indices(take(s, 7))
    s.close()
    val = {int(k) for k, v in _keys_by_split(d).items() if v == "validation"}
    assert sorted(got) == sorted(val) and len(val) == 21


def _keys_by_split(d: Path) -> dict[str, str]:
    out = {}
    for s in shards.read_manifest(d)["shards"]:
        with tarfile.open(d / s["name"]) as tf:
            for name in tf.getnames():
                out[name.split(".")[0]] = s["split"]
    return out


# ----------------------------------------------------------------------------- corrupt


class _Trap:
    """Unpickling this creates a file: proof that something unpickled a member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    trap = tmp_path / "unpickled"
    good = list(range(10))
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(14):
            s = {"__key__": f"{i:04d}", "json": json.dumps({"index": i}).encode()}
            if i in good:
                s["npy"] = _npy(np.full((2, 3), i, dtype=np.float32))
            elif i == 10:
                s["npy"] = b"this is not an npy file"
            elif i == 11:
                s["npy"] = _npy(np.array([_Trap(str(trap))] * 6, dtype=object).reshape(2, 3))
            elif i == 12:
                s["npy"] = _npy(np.zeros((4, 4), dtype=np.float32))  # wrong shape
            # i == 13: no npy at all
            w.write(s)
    with pytest.warns(UserWarning, match="inferred"):
        cfg = cfg_for(path, batch_per_rank=7)
        s = build_stream(cfg, rank=0, world_size=1, seed=0)
    batches = take(s, 4)  # 28 samples = two epochs of 14 slots
    for b in batches:
        idx = b["label"].long()
        assert set(idx.tolist()) <= set(good)
        # Every yielded x is the one stored for its index.
        assert torch.equal(b["x"], idx.float()[:, None, None].expand(-1, 2, 3))
    assert s.corrupt_count == 2 * 4
    assert sorted(set(indices(batches[:2]))) == good  # every valid sample in epoch 0
    assert not trap.exists(), "an object array was unpickled"
    s.close()


def _truncate_after_sample(path: Path, keep: int) -> tuple[set[int], set[int]]:
    """Cut a shard 100 bytes into the header that follows its ``keep``-th sample; return
    the indices of the samples kept whole and of those lost."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    keys = list(dict.fromkeys(int(m.name.split(".")[0]) for m in members))
    last = [m for m in members if int(m.name.split(".")[0]) == keys[keep - 1]][-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    with open(path, "r+b") as f:
        f.truncate(end + 100)
    return set(keys[:keep]), set(keys[keep:])


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    d = write_ising(tmp_path / "s")
    first = shards.read_manifest(d)["shards"][0]
    kept, lost = _truncate_after_sample(d / first["name"], keep=4)
    assert len(lost) == first["num_samples"] - 4
    with pytest.warns(UserWarning, match="train-000000.tar"):
        s = build_stream(cfg_for(d, batch_per_rank=5), rank=0, world_size=1, seed=0)
    got = indices(take(s, 21))  # one epoch: 105 slots
    assert s.corrupt_count == len(lost)
    assert not set(got) & lost and kept <= set(got)
    assert len(set(got)) == 105 - len(lost)
    s.close()


def test_no_valid_sample_and_missing_shard_are_errors(tmp_path):
    d = write_ising(tmp_path / "s", per_shard=60)
    for s in shards.read_manifest(d)["shards"]:
        with open(d / s["name"], "r+b") as f:
            f.truncate(300)  # not even one header
    with pytest.warns(UserWarning):
        s = build_stream(cfg_for(d), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="no valid sample.*train-00000"):
        next(s)
    s.close()
    (d / "train-000001.tar").unlink()
    with pytest.raises(ValueError, match="train-000001.tar.*missing"):
        build_stream(cfg_for(d), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="train-000001.tar does not exist"):
        build_stream(cfg_for(f"{d}/train-{{000000..000001}}.tar"), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="exited with status"):
        s = build_stream(cfg_for("pipe:cat /nonexistent/x.tar"), rank=0, world_size=1, seed=0)


def test_sha256_verify_mode_warns_on_modified_shard(tmp_path):
    d = write_ising(tmp_path / "s")
    p = d / "train-000002.tar"
    data = bytearray(p.read_bytes())
    data[data.index(b"\x93NUMPY") + 100] ^= 0x02  # inside the npy header's padding
    p.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_stream(cfg_for(d), rank=0, world_size=1, seed=0).close()  # size check passes
    with pytest.warns(UserWarning, match="train-000002.tar.*sha256"):
        build_stream(cfg_for(d, verify="sha256"), rank=0, world_size=1, seed=0).close()


def test_bad_config_is_rejected(ising_dir):
    with pytest.raises(ConfigError, match="verify"):
        build_stream(cfg_for(ising_dir, verify="maybe"), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        build_stream(cfg_for(ising_dir), rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than world_size"):
        build_stream(cfg_for(ising_dir / "train-000000.tar"), rank=0, world_size=11, seed=0)
    with pytest.raises(ValueError, match="without manifest.json"):
        build_stream(cfg_for(ising_dir.parent), rank=0, world_size=1, seed=0)
