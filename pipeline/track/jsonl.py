"""The files of metrics.jsonl and track.json: line-per-record JSON that survives a crash.

Strict JSON lines (NaN/Inf are written as null by the caller), atomic replacement of small
JSON state files, and the repair of a line torn by a crash mid-write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, allow_nan=False, default=str, separators=(",", ":")) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))  # fsynced: track.json survives power loss


def last_step_in_jsonl(path: Path, tail_bytes: int = 1 << 16) -> int:
    """Largest "step" among the last complete lines of metrics.jsonl (-1 if none)."""
    if not path.is_file():
        return -1
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        lines = f.read().split(b"\n")
    best = -1
    for line in lines:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            best = max(best, step)
    return best


def repair_torn_tail(path: Path) -> None:
    """Cut a half-written last line (crash mid-write) so appended lines stay parseable."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
