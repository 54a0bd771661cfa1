"""Fixtures of the integration tests: a real S3 API server on loopback."""

from __future__ import annotations

import logging
import uuid

import pytest

from tests.conftest import free_port


class S3Server:
    """moto's S3 server (``moto.server.ThreadedMotoServer``: the real HTTP API, werkzeug on
    127.0.0.1) that a test can stop and start again on the same port. Its objects live in
    this process's moto backend, so they survive a restart, as a real store's do."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        assert self._server is None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def s3(monkeypatch):
    """A running S3 server, the AWS_* variables pointing at it (for this process and, through
    ``subprocess_env``, for launched ones) and a fresh bucket ``s3.bucket``; stopped at the end."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = S3Server()
    server.start()
    # Credentials of the test server only; the user's ~/.aws files must not leak in.
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    server.bucket = f"test-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=server.bucket)
    try:
        yield server
    finally:
        server.stop()
