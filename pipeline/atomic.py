"""Durable atomic replacement of small files (a leaf module: imports nothing of pipeline).

Write a temporary file beside the target, fsync it, rename it over the target and fsync the
directory, so that after a crash or power loss the target holds either the old or the new
content, never a torn mix (rename is atomic on POSIX file systems; without the fsyncs the
rename can reach the disk before the data does). Used for checkpoint manifests, LATEST and
the tracker's track.json.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
