"""`pipeline shards hdf5`: CaloChallenge-layout files written here with h5py -> shards ->
stream, compared bitwise with the source rows; bounded reads; every user error exits 2."""

from __future__ import annotations

import math
import re
import tracemalloc

import h5py
import numpy as np
import pytest

from pipeline.cli import main as pipeline_main
from pipeline.data import shards, sources, tario
from pipeline.data.config import DataConfig
from pipeline.data.stream import build_stream
from pipeline.eval.reference import load_reference


def _calo_file(path, num_rows: int, row_shape: tuple[int, ...], dtype, *, seed: int = 0, chunks=None) -> dict:
    rng = np.random.default_rng(seed)
    x = (rng.gamma(0.5, 30.0, size=(num_rows, *row_shape)) * (rng.random((num_rows, *row_shape)) < 0.6)).astype(dtype)
    if np.dtype(dtype) == np.float16:  # the extremes of the format too: subnormal, max, tiny
        x.reshape(num_rows, -1)[0, :3] = [np.float16(6e-8), np.float16(65504), np.float16(-2.0**-14)]
    e = np.exp(rng.uniform(math.log(1e3), math.log(1e6), size=(num_rows, 1))).astype(np.float32)
    if str(path).endswith(".zarr"):
        import zarr

        g = zarr.open_group(str(path), mode="w")
        g.create_array("showers", data=x, chunks=chunks or "auto")
        g.create_array("incident_energies", data=e)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("showers", data=x, chunks=chunks)
            f["incident_energies"] = e
    return {"showers": x, "incident_energies": e}


def _stream_all(out, num_train: int, batch: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    assert num_train % batch == 0
    s = build_stream(DataConfig(train_urls=str(out), batch_per_rank=batch, shuffle_buffer=16, label_key=label_key),
                     rank=0, world_size=1, seed=0)
    try:
        bs = [next(s) for _ in range(num_train // batch)]  # one epoch
    finally:
        s.close()
    assert all(b["x"].dtype.is_floating_point and b["x"].dtype.itemsize == 4 for b in bs)  # float32
    return np.concatenate([b["x"].numpy() for b in bs]), np.concatenate([b["label"].numpy() for b in bs])


@pytest.mark.parametrize("store", ["calo.h5", "calo.zarr"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("row_shape,cli_shape,sample_shape", [
    ((12,), [], (12,)),  # vectors
    ((24,), ["--x-shape", "2,3,4"], (2, 3, 4)),  # [C, H, W]
    ((24,), ["--x-shape", "2,3,4", "--add-channel-dim"], (1, 2, 3, 4)),  # [C, D, H, W] volumes
    ((2, 2, 2, 3), [], (2, 2, 2, 3)),  # stored N-D already
])
def test_round_trip_is_bitwise(tmp_path, store, dtype, row_shape, cli_shape, sample_shape):
    src = _calo_file(tmp_path / store, 60, row_shape, dtype)
    out = tmp_path / "shards"
    assert pipeline_main(["shards", "hdf5", "--path", str(tmp_path / store), "--x-key", "showers",
                          "--label-key", "incident_energies", *cli_shape, "--out", str(out),
                          "--samples-per-shard", "16", "--val-fraction", "0.2"]) == 0
    m = shards.read_manifest(out)
    assert m["meta"]["sample_shape"] == list(sample_shape) and m["meta"]["label_kind"] == "continuous"
    assert m["schema"]["npy"] == {"dtype": np.dtype(dtype).name, "shape": list(sample_shape)}
    assert m["info"]["label_json_key"] == "incident_energies" and "incident_energies" in m["schema"]["json"]["keys"]
    x, index = _stream_all(out, 48, 8, "index")
    idx = index.astype(np.int64)
    assert sorted(idx) == sorted(shards.split_indices(60, 0.2, 0)["train"])  # each train sample once
    ref = src["showers"][idx].reshape(len(idx), *sample_shape).astype(np.float32)  # float16 -> float32 is exact
    assert np.array_equal(x, ref) and x.tobytes() == ref.tobytes()
    _, energy = _stream_all(out, 48, 8, "incident_energies")
    assert np.array_equal(np.sort(energy), np.sort(src["incident_energies"][idx, 0]))
    held = load_reference(str(out), split="validation")  # the json label is the exact float32 value
    vi = np.asarray([d["index"] for d in held.json])
    assert [d["incident_energies"] for d in held.json] == src["incident_energies"][vi, 0].tolist()


def test_float16_npy_decodes_exactly():
    a = np.array([[0.0, 6e-8, -65504, 1 / 3, np.float16(2.0**-24)]], dtype=np.float16)
    one = shards._npy_bytes(a)
    buf = one * 3
    offsets, sizes = np.array([0, len(one), 2 * len(one)]), np.full(3, len(one))
    out, valid = tario.decode_npy_batch(buf, offsets, sizes, a.shape)
    assert valid.all() and out.dtype == np.float32
    assert np.array_equal(out, np.broadcast_to(a.astype(np.float32), out.shape))


def test_class_labels(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
        f["y"] = np.arange(40) % 3
    data = sources.hdf5(str(path), x_key="x", label_key="y", label_kind="class")
    assert data.meta.label_kind == "class" and data.meta.num_classes == 3
    assert np.array_equal(data.cls, np.arange(40) % 3) and not data.json_columns
    assert np.array_equal(data.x[np.array([5, 2, 5])], np.arange(240, dtype=np.float32).reshape(40, 6)[[5, 2, 5]])


@pytest.mark.parametrize("store", ["big.h5", "big.zarr"])
def test_reads_are_bounded_slices(tmp_path, store):
    """A 4000 x 1024 float32 file (16 MiB), chunked by 50 rows, written as shards of 100
    samples with read blocks of 64 rows: h5py (zarr) is never asked for more than one block,
    the statistics pass reads every row exactly once, and the peak of what Python holds stays
    far below the file's size."""
    path = tmp_path / store
    src = _calo_file(path, 4000, (1024,), np.float32, chunks=(50, 1024))
    tracemalloc.start()
    try:
        data = sources.hdf5(str(path), x_key="showers", block_bytes=64 * 1024 * 4)
        shards.write_shards(data, tmp_path / "out", source="hdf5", params={}, samples_per_shard=100,
                            val_fraction=0.1, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.x.block_rows == 64 and max(data.x.reads) <= 64 and len(data.x.reads) > 4000 // 64
    # Held at once: one group (100 rows, 400 KiB) and a read block with its temporaries.
    assert peak < src["showers"].nbytes / 6, peak
    held = load_reference(str(tmp_path / "out"), split="all")
    order = np.asarray([d["index"] for d in held.json])
    assert np.array_equal(held.x, src["showers"][order])


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
        f.create_group("grp").create_dataset("inner", data=np.zeros(3))
    return str(path)


@pytest.mark.parametrize("case,args,message", [
    ("missing file", ["--path", "{d}/nope.h5", "--x-key", "showers"], "no such file"),
    ("missing key", ["--path", "{f}", "--x-key", "shower"], "no dataset 'shower'.*'grp/inner', 'incident_energies', 'nan', 'short', 'showers', 'text', 'wide'"),
    ("group", ["--path", "{f}", "--x-key", "grp"], "no dataset 'grp'"),
    ("missing label", ["--path", "{f}", "--x-key", "showers", "--label-key", "energy"], "no dataset 'energy'"),
    ("non-numeric", ["--path", "{f}", "--x-key", "text"], "dtype .*not a numeric"),
    ("label length", ["--path", "{f}", "--x-key", "showers", "--label-key", "short"], "'short' has 9 rows, the samples have 10"),
    ("label width", ["--path", "{f}", "--x-key", "showers", "--label-key", "wide"], "one value per sample"),
    ("shape", ["--path", "{f}", "--x-key", "showers", "--x-shape", "5,5"], "25 elements.*12 elements"),
    ("nan", ["--path", "{f}", "--x-key", "nan"], "NaN or Inf in row 7"),
    ("spins", ["--path", "{f}", "--x-key", "showers", "--data-kind", "spins"], "spins needs every value"),
])
def test_user_errors_exit_2_and_write_nothing(tmp_path, capsys, case, args, message):
    nan = np.ones((10, 4), dtype=np.float32)
    nan[7, 2] = np.nan
    f = _h5(tmp_path / "f.h5", showers=np.random.default_rng(0).random((10, 12)).astype(np.float32),
            incident_energies=np.ones((10, 1), np.float32), text=np.array([b"a"] * 10), short=np.ones(9),
            wide=np.ones((10, 2)), nan=nan)
    out = tmp_path / "out"
    argv = ["shards", "hdf5", *[a.format(d=tmp_path, f=f) for a in args], "--out", str(out)]
    assert pipeline_main(argv) == 2, case
    err = capsys.readouterr().err
    assert "pipeline shards hdf5: error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_many_continuous_labels_get_a_range_the_vdm_standardises_by(tmp_path):
    """More than 256 distinct energies are not listed as label_values; the manifest keeps their
    range, and the VDM's label embedding centres and scales by it (not by a [0, 1] default)."""
    from pipeline.objectives.vdm.denoiser import Denoiser

    src = _calo_file(tmp_path / "e.h5", 300, (4,), np.float32)
    out = tmp_path / "s"
    assert pipeline_main(["shards", "hdf5", "--path", str(tmp_path / "e.h5"), "--x-key", "showers",
                          "--label-key", "incident_energies", "--out", str(out)]) == 0
    meta = shards.meta_from_dict(shards.read_manifest(out)["meta"])
    e = src["incident_energies"][:, 0].astype(np.float64)
    assert meta.label_values is None and meta.label_range == (e.min(), e.max())
    d = Denoiser(net=None, emb_dim=8, meta=meta)
    emb = d.label_emb
    assert emb.label_mean == pytest.approx((e.min() + e.max()) / 2) and emb.label_std == pytest.approx((e.max() - e.min()) / 2)


def test_zarr_missing_array_names_the_arrays(tmp_path, capsys):
    _calo_file(tmp_path / "s.zarr", 5, (3,), np.float32)
    assert pipeline_main(["shards", "hdf5", "--path", str(tmp_path / "s.zarr"), "--x-key", "x",
                          "--out", str(tmp_path / "o")]) == 2
    assert "has no dataset 'x' (--x-key); its datasets are ['incident_energies', 'showers']" in capsys.readouterr().err
    assert pipeline_main(["shards", "hdf5", "--path", str(tmp_path / "none.zarr"), "--x-key", "x",
                          "--out", str(tmp_path / "o")]) == 2
    assert "no such Zarr store" in capsys.readouterr().err and not (tmp_path / "o").exists()
