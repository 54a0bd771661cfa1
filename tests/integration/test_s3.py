"""Shards in object storage (issue 16, section 2), against a real S3 API server on loopback
(moto's server mode, started by the ``s3`` fixture): the shard writer and verifier on an
s3:// prefix, training from it on 1 and 2 processes equal to training from local disk, a
server restart mid-epoch, a deleted shard, and stores that cannot be reached at start-up."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import accelerate_launch, free_port, run_pipeline, subprocess_env
from tests.integration.test_walking_skeleton import TINY

pytestmark = pytest.mark.integration

ISING = ["ising", "--temperature", "3.0", "--size", "8", "--num-samples", "512", "--seed", "0",
         "--samples-per-shard", "128"]  # the parameters of the ising_shards fixture


def _upload(s3, local: Path, prefix: str) -> str:
    """Copy a local shard directory to s3://bucket/prefix/ (bytes unchanged); its URL."""
    client = s3.client()
    for f in sorted(local.iterdir()):
        client.upload_file(str(f), s3.bucket, f"{prefix}/{f.name}")
    return f"s3://{s3.bucket}/{prefix}/"


def _metrics(run_dir: Path) -> list[dict]:
    """The logged training metrics per step, without those that measure time or memory
    (``*_s``, ``perf/``, ``sys/``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("vdm/", "train/", "data/")) and not k.endswith("_s")
             or k == "step"} for r in rows if "event" not in r]


def test_shards_cli_writes_to_s3_and_verifies(s3, ising_shards):
    url = f"s3://{s3.bucket}/ising"
    run_pipeline("shards", *ISING, "--out", url)
    local = json.loads((ising_shards / "manifest.json").read_text())
    remote = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="ising/manifest.json")["Body"].read())
    # Same parameters, same bytes: the shards in the bucket are those written to local disk.
    assert remote["shards"] == local["shards"]
    objects = {o["Key"]: o for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="ising/")["Contents"]}
    assert set(objects) == {f"ising/{s['name']}" for s in local["shards"]} | {"ising/manifest.json"}
    # The manifest went up last (no staging objects are left behind either).
    assert all(o["LastModified"] <= objects["ising/manifest.json"]["LastModified"] for o in objects.values())
    again = run_pipeline("shards", *ISING, "--out", url)
    assert "up to date" in again.stdout

    assert "all shards match" in run_pipeline("shards", "verify", url, "--sha256").stdout
    s3.client().delete_object(Bucket=s3.bucket, Key="ising/train-000001.tar")
    r = run_pipeline("shards", "verify", url, check=False)
    assert r.returncode == 1 and f"shard {url}/train-000001.tar is missing" in r.stdout


def _train(tmp_path, name, urls, *, processes=1, extra=()):
    run = tmp_path / name
    args = ["train", "--config", "configs/quickstart.yaml", f"run.dir={run}", f"data.train_urls={urls}",
            "train.num_steps=3", "train.checkpoint_every_steps=3", "data.shuffle_buffer=64", *TINY, *extra]
    if processes == 1:
        run_pipeline(*args)
    else:
        accelerate_launch(processes, *args)
    manifest = json.loads((run / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    return _metrics(run), manifest.get("data", manifest.get("samples_seen"))


def test_training_from_s3_equals_training_from_local_disk(s3, ising_shards, tmp_path):
    url = _upload(s3, ising_shards, "ising")
    from_s3 = _train(tmp_path, "s3", url)
    from_disk = _train(tmp_path, "local", ising_shards)
    assert len(from_s3[0]) == 3 and from_s3 == from_disk


def test_two_processes_train_from_s3_as_from_local_disk(s3, ising_shards, tmp_path):
    url = _upload(s3, ising_shards, "ising")
    # Brace notation over the shard objects (counts from the manifest next to them), 1 worker each.
    shards = url + "train-{000000..000003}.tar"
    from_s3 = _train(tmp_path, "s3", shards, processes=2, extra=["data.num_workers=1"])
    from_disk = _train(tmp_path, "local", f"{ising_shards}/train-{{000000..000003}}.tar", processes=2,
                       extra=["data.num_workers=1"])
    assert len(from_s3[0]) == 3 and from_s3 == from_disk


def _stream(url: str, batch_per_rank: int = 32):
    from pipeline.data.config import DataConfig
    from pipeline.data.stream import build_stream

    # shuffle_buffer 64 < 128 samples per shard: every window is one shard, read when reached.
    cfg = DataConfig(train_urls=url, batch_per_rank=batch_per_rank, num_workers=0, shuffle_buffer=64)
    return build_stream(cfg, rank=0, world_size=1, seed=0)


def _keys_of(batches) -> list[bytes]:
    return [b["x"].numpy().tobytes() for b in batches]


def test_stream_continues_across_a_server_restart(s3, ising_shards):
    url = _upload(s3, ising_shards, "ising")
    uninterrupted = _keys_of(next(s) for s in [_stream(url)] * 20)  # more than one epoch (14.4 batches)
    stream = _stream(url)
    first = [next(stream) for _ in range(4)]  # exactly window 0; batch 5 reads the next shard
    s3.stop()
    restart = threading.Timer(1.5, s3.start)  # back while the stream is still retrying
    restart.start()
    rest = [next(stream) for _ in range(16)]
    restart.join()
    assert _keys_of(first + rest) == uninterrupted  # nothing repeated, nothing lost
    assert stream.storage_retries >= 1 and stream.corrupt_count == 0


def test_deleted_shard_is_skipped_counted_and_named(s3, ising_shards, caplog):
    url = _upload(s3, ising_shards, "ising")
    stream = _stream(url, batch_per_rank=1)  # resolved while every shard is there
    s3.client().delete_object(Bucket=s3.bucket, Key="ising/train-000002.tar")
    gone = f"{url}train-000002.tar"
    lost = dict(zip(stream.shard_set.urls, stream.shard_set.num_samples))[gone]
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        for _ in range(stream.samples_per_epoch):
            next(stream)
    # Every slot of the deleted shard in this epoch was filled by a substitute and counted.
    assert stream.corrupt_count == lost
    named = [r.getMessage() for r in caplog.records if gone in r.getMessage()]
    assert len(named) == 1 and "corrupt, skipped" in named[0] and "does not exist" in named[0]


def test_unreachable_store_at_start_up_is_exit_2_before_run_dir(tmp_path):
    run = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = subprocess_env(AWS_ENDPOINT_URL=dead, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                         AWS_DEFAULT_REGION="us-east-1")
    r = run_pipeline("train", "--config", "configs/quickstart.yaml", f"run.dir={run}",
                     "data.train_urls=s3://some-bucket/ising/", "track.wandb=off", env=env, check=False)
    assert r.returncode == 2, r.stderr
    assert f"endpoint {dead}" in r.stderr and "AWS_ACCESS_KEY_ID" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr
    assert not run.exists()


def test_missing_bucket_or_manifest_is_a_config_error(s3):
    from pipeline.data.stream import read_meta
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="bucket does not exist"):
        read_meta("s3://no-such-bucket-here/ising/")
    with pytest.raises(ConfigError, match=f"s3://{s3.bucket}/empty/manifest.json does not exist"):
        read_meta(f"s3://{s3.bucket}/empty/")
    with pytest.raises(ConfigError, match=f"shard s3://{s3.bucket}/x/train-000000.tar does not exist"):
        read_meta(f"s3://{s3.bucket}/x/train-{{000000..000001}}.tar")


def test_credentials_are_refused_in_the_config():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    for override in ("data.aws_secret_access_key=abc", "data.endpoint_url=http://minio:9000"):
        with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY.*AWS_ENDPOINT_URL"):
            load_config("configs/quickstart.yaml", [override])
    with pytest.raises(ConfigError, match="must not hold credentials") as e:
        load_config("configs/quickstart.yaml", ["data.train_urls=s3://AKIAXXXX:hunter2@bucket/p/"])
    assert "hunter2" not in str(e.value)
