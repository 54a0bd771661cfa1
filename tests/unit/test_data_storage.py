"""pipeline/data/storage.py without a server: URL kinds, credentials in URLs, local reads and
sizes, and the retry loop (a callable that fails a given number of times stands in for a
store; the real server's faults are in tests/integration/test_s3.py)."""

from __future__ import annotations

import pytest

from pipeline.data import storage
from pipeline.errors import ConfigError


def test_url_kinds_join_and_parent():
    assert [storage.kind(u) for u in ("s3://b/p/x.tar", "gs://b/x", "hf://datasets/a/b", "https://h/x.tar",
                                       "data/x.tar", "/abs/x.tar", "file:/abs/x.tar", "pipe:cat x.tar")] == [
        "remote", "remote", "remote", "remote", "local", "local", "local", "pipe"]
    assert storage.join("s3://b/p/", "manifest.json") == "s3://b/p/manifest.json"
    assert storage.join("s3://b/p", "manifest.json") == "s3://b/p/manifest.json"
    assert storage.parent("s3://b/p/train-000000.tar") == "s3://b/p"


def test_credentials_in_a_url_are_refused_without_echoing_them():
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID") as e:
        storage.check_url("s3://AKIAEXAMPLE:s3cr3t-value@bucket/prefix/")
    assert "s3cr3t-value" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    storage.check_url("s3://bucket/prefix/")  # no credentials: fine


def test_local_reads_ranges_and_sizes(tmp_path):
    data = bytes(range(256)) * 4
    (tmp_path / "a.bin").write_bytes(data)
    url = str(tmp_path / "a.bin")
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 10, 300) == data[10:300]
    storage.write_bytes(str(tmp_path / "b.bin"), b"xyz")
    assert storage.sizes([url, str(tmp_path / "b.bin"), str(tmp_path / "none")]) == {
        url: 1024, str(tmp_path / "b.bin"): 3, str(tmp_path / "none"): None}
    assert sorted(storage.list_sizes(str(tmp_path))) == ["a.bin", "b.bin"]  # no .tmp left


def _flaky(failures: int, error: Exception):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return "ok"

    return call, calls


def test_transient_errors_are_retried_with_backoff_and_counted(monkeypatch):
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    before = storage.retry_count()
    call, calls = _flaky(3, ConnectionResetError("reset by peer"))
    assert storage._with_retries("reading", "s3://b/x", call) == "ok"
    assert len(calls) == 4 and storage.retry_count() - before == 3
    assert slept == [storage.BACKOFF_S, 2 * storage.BACKOFF_S, 4 * storage.BACKOFF_S]  # exponential

    call, calls = _flaky(storage.ATTEMPTS, TimeoutError("read timed out"))
    with pytest.raises(storage.Unreadable, match=f"failed {storage.ATTEMPTS} times.*TimeoutError"):
        storage._with_retries("reading", "s3://b/x", call)
    assert len(calls) == storage.ATTEMPTS
    assert max(slept) == storage.MAX_BACKOFF_S  # capped


def test_missing_objects_and_refused_access_are_not_retried(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: pytest.fail("slept"))
    call, calls = _flaky(1, FileNotFoundError("b/x"))
    with pytest.raises(storage.NotFound, match="s3://b/x does not exist"):
        storage._with_retries("reading", "s3://b/x", call)
    call, calls = _flaky(1, PermissionError("Access Denied"))
    with pytest.raises(storage.Unreadable, match="Access Denied"):
        storage._with_retries("reading", "s3://b/x", call)
    assert len(calls) == 1
