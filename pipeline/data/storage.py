"""All remote I/O of the data layer: shards and manifests in object storage, through fsspec.

A URL is one of three kinds (:func:`kind`): ``pipe:`` (a shell command's stdout, read by
:func:`pipeline.data.tario.read_url`), ``remote`` (``s3://``, ``gs://``, ``hf://``,
``https://``, any fsspec protocol but ``file``), or ``local`` (a path, optionally
``file:``). This module reads and writes the remote kind and answers the questions the
resolver, the stream and the shard writer ask of both remote and local URLs (exists, list
with sizes, join), so that no other module imports fsspec.

Credentials and the endpoint come from the environment or the protocol's usual config
files, never from the run's YAML: for S3, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (S3-compatible stores: MinIO, Ceph RGW) and
``~/.aws/credentials`` / ``~/.aws/config``, as botocore reads them.

Retries: one place. A transient error (connection refused or reset, timeout, 5xx) is
retried up to :data:`ATTEMPTS` times in all with exponential backoff, ``BACKOFF_S * 2**i``
seconds capped at :data:`MAX_BACKOFF_S` (about 7.75 s of waiting in all, enough for a
restarting server or a load balancer failing over). For S3 the lower layers' own retries
are turned off (botocore ``max_attempts=1``, s3fs ``retries=1``), so every retry is one of
ours and counted in :func:`retry_count` (per process; the stream sums its workers'). A
missing object, a missing bucket or refused credentials are not transient: they are raised
at once (:class:`NotFound`, :class:`Unreadable`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, TypeVar

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.data")

ATTEMPTS = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
_ENV_HINT = ("credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
             "AWS_ENDPOINT_URL for MinIO/Ceph) or ~/.aws/credentials, never from the config")

_PROTOCOL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Errors that retrying cannot fix: the object or bucket is not there, access is refused, or
# the URL / a call is wrong. Everything else raised by a store is taken as transient.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
              TypeError, ImportError, NotImplementedError)

_LISTING = ("s3", "s3a", "gs", "gcs")  # protocols whose prefixes list cheaply
_retries = 0  # transient failures retried in this process
_filesystems: dict[tuple, Any] = {}  # (protocol, pid, AWS_* environment) -> fsspec filesystem

T = TypeVar("T")


class Unreadable(ValueError):
    """A remote object could not be read or written: after the retries, or refused at once."""


class NotFound(Unreadable):
    """The object (or its bucket) does not exist."""


# ------------------------------------------------------------------------------ URL kinds


def kind(url: str) -> str:
    """``"pipe"``, ``"remote"`` (an fsspec protocol other than ``file``) or ``"local"``."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _PROTOCOL.match(url)
    return "remote" if m and m.group(1).lower() != "file" else "local"


def is_remote(url: str) -> bool:
    return kind(str(url)) == "remote"


def check_url(url: str) -> None:
    """ConfigError for a remote URL that carries credentials (``s3://KEY:SECRET@bucket``)."""
    m = _PROTOCOL.match(url)
    if m and "@" in url[m.end():].split("/", 1)[0]:
        shown = m.group(0) + "<redacted>@" + url[m.end():].split("@", 1)[1]
        raise ConfigError(f"{shown}: a data URL must not hold credentials; {_ENV_HINT}")


def join(base: str, name: str) -> str:
    """``base``/``name`` for a remote prefix or a local directory."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def parent(url: str) -> str:
    """The prefix (remote) or directory (local) holding ``url``."""
    if is_remote(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(url)


def retry_count() -> int:
    """Transient failures retried in this process so far."""
    return _retries


# ------------------------------------------------------------------------ the filesystems


def _filesystem(url: str):
    """The fsspec filesystem of ``url``'s protocol, one per process (fsspec's event loop and
    connections do not survive a fork into DataLoader workers)."""
    protocol = _PROTOCOL.match(url).group(1).lower()
    # A changed endpoint or credential in the environment gets a filesystem of its own.
    key = (protocol, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _filesystems:
        import fsspec

        try:
            if protocol in ("s3", "s3a"):
                # Listings are not cached: a shard deleted or rewritten while a run reads is seen.
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, config_kwargs={
                    "retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60})
                fs.retries = 1  # s3fs's own retry loop; ours counts every attempt
            else:
                fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{url}: no filesystem for protocol {protocol!r} ({e}); install its fsspec "
                              "implementation (s3fs for s3://, gcsfs for gs://, huggingface_hub for hf://, "
                              "aiohttp for https://)") from None
        _filesystems[key] = fs
    return _filesystems[key]


def _with_retries(what: str, url: str, call: Callable[[], T]) -> T:
    """``call()``, retried on transient errors with exponential backoff (counted)."""
    global _retries
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except FileNotFoundError as e:
            raise NotFound(f"{url} does not exist ({e})") from None
        except _PERMANENT as e:
            raise Unreadable(f"{what} {url}: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any other store error is taken as transient
            if attempt == ATTEMPTS - 1:
                raise Unreadable(f"{what} {url} failed {ATTEMPTS} times, the last with "
                                 f"{type(e).__name__}: {e}") from None
            _retries += 1
            delay = min(BACKOFF_S * 2 ** attempt, MAX_BACKOFF_S)
            log.info("%s %s: %s: %s; retry %d of %d in %.2f s", what, url, type(e).__name__, e,
                     attempt + 1, ATTEMPTS - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- operations


def read_bytes(url: str, start: int | None = None, stop: int | None = None) -> bytes:
    """The bytes of object ``url`` (``[start, stop)`` when given: a ranged GET)."""
    if not is_remote(url):
        with open(url.removeprefix("file:"), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if stop is None else f.read(stop - (start or 0))
    fs = _filesystem(url)
    return _with_retries("reading", url, lambda: fs.cat_file(url, start=start, end=stop))


def exists(url: str) -> bool:
    """Whether object ``url`` exists; a missing bucket is :class:`NotFound`, an unreachable
    store :class:`Unreadable`."""
    if not is_remote(url):
        return os.path.isfile(url.removeprefix("file:"))
    fs = _filesystem(url)
    try:
        _with_retries("checking", url, lambda: fs.info(url))
        return True
    except NotFound as e:
        if "bucket" in str(e).lower():
            raise
        return False


def list_sizes(prefix: str) -> dict[str, int]:
    """Name -> size in bytes of every object directly under ``prefix`` (remote) or every
    file in directory ``prefix`` (local)."""
    if not is_remote(prefix):
        with os.scandir(prefix) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    fs = _filesystem(prefix)
    entries = _with_retries("listing", prefix, lambda: fs.ls(prefix, detail=True))
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}


def sizes(urls: list[str]) -> dict[str, int | None]:
    """Size in bytes of each of ``urls`` (None: it does not exist). Object stores that list
    (s3, gs) are asked once per prefix; others (https, hf) once per object."""
    out: dict[str, int | None] = {}
    by_parent: dict[str, list[str]] = {}
    for u in urls:
        if not is_remote(u):
            path = u.removeprefix("file:")
            out[u] = os.path.getsize(path) if os.path.isfile(path) else None
        elif _PROTOCOL.match(u).group(1).lower() in _LISTING:
            by_parent.setdefault(parent(u), []).append(u)
        else:
            fs = _filesystem(u)
            try:
                out[u] = int(_with_retries("checking", u, lambda: fs.info(u))["size"])
            except NotFound:
                out[u] = None
    for prefix, members in by_parent.items():
        try:
            listed = list_sizes(prefix)
        except NotFound as e:
            if "bucket" in str(e).lower():
                raise
            listed = {}
        for u in members:
            out[u] = listed.get(u.rsplit("/", 1)[1])
    return out


def write_bytes(url: str, data: bytes) -> None:
    """Put object ``url``. Atomic from a reader's view: an S3 PUT becomes visible whole or
    not at all; a local file is written beside and renamed."""
    if not is_remote(url):
        path = url.removeprefix("file:")
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs = _filesystem(url)
    _with_retries("writing", url, lambda: fs.pipe_file(url, data))


def upload(local_path: str, url: str) -> None:
    """Copy a local file to object ``url`` (one atomic PUT, or a multipart upload that
    becomes visible only when it completes)."""
    fs = _filesystem(url)
    _with_retries("uploading", url, lambda: fs.put_file(local_path, url))


def delete(url: str) -> None:
    """Remove object ``url`` if it exists."""
    if not is_remote(url):
        try:
            os.unlink(url.removeprefix("file:"))
        except FileNotFoundError:
            pass
        return
    fs = _filesystem(url)
    try:
        _with_retries("deleting", url, lambda: fs.rm_file(url))
    except NotFound:
        pass


def require(url: str, what: str) -> None:
    """ConfigError unless object ``url`` exists: naming the store and the endpoint when it
    cannot be reached (unreachable endpoint, missing bucket, refused credentials), said
    before training starts."""
    check_url(url)
    try:
        found = exists(url)
    except Unreadable as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        where = f" (endpoint {endpoint})" if url.startswith(("s3://", "s3a://")) else ""
        raise ConfigError(f"data store of {url}{where} cannot be read: {e}; {_ENV_HINT}") from None
    if not found:
        raise ConfigError(f"{what} {url} does not exist")
