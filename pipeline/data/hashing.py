"""The sha256 of a file, read in 1 MiB blocks (memory bounded for any file size).

A leaf module (standard library only) so that both the shard writer/verifier
(:mod:`pipeline.data.shards`) and the checkpointer (:mod:`pipeline.train.checkpoint`) use
the one helper without an import circle.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
