"""Read the history back out of W&B's local run files (``run-<id>.wandb``), no account needed.

wandb >= 0.2x no longer ships a Python reader (the old ``wandb.sdk.internal.datastore`` went
away with the Go core), so this is a small one. The file is a LevelDB *log* (not a table):
https://github.com/google/leveldb/blob/main/doc/log_format.md

    file   := header block*             header := ":W&B" magic:uint16=0xBEE1 version:uint8
    block  := record* trailer?          (32 KiB blocks counted from the start of the file)
    record := crc:uint32 length:uint16 type:uint8 data[length]   (little-endian)

``type`` is FULL/FIRST/MIDDLE/LAST (a payload larger than what is left of a block is split),
``crc`` is zlib's CRC-32 of the type byte followed by the data, and each reassembled payload
is one ``wandb_internal_pb2.Record`` protobuf. History rows are ``Record.history``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

from pipeline.run_dir import RunDir

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK_BYTES = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Yield the raw protobuf payloads of a ``.wandb`` file, in write order.

    A file cut short by a crash ends early (the torn tail is ignored); a corrupt record in
    the middle raises ``ValueError``.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file ({len(data)} bytes)")
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    offset = _FILE_HEADER.size
    pending: list[bytes] | None = None
    while offset < len(data):
        left_in_block = _BLOCK_BYTES - offset % _BLOCK_BYTES
        if left_in_block < _RECORD_HEADER.size:  # zero trailer: next record starts a new block
            offset += left_in_block
            continue
        if offset + _RECORD_HEADER.size > len(data):
            break  # torn tail
        crc, length, rtype = _RECORD_HEADER.unpack_from(data, offset)
        start = offset + _RECORD_HEADER.size
        end = start + length
        if end > len(data):
            break  # torn tail
        if crc == 0 and length == 0 and rtype == 0:  # zero padding at the end of a block
            offset += left_in_block
            continue
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            if end >= len(data):
                break  # half-written last record
            raise ValueError(f"{path}: checksum mismatch in record at byte {offset}")
        offset = end
        if rtype == _FULL:
            yield chunk
        elif rtype == _FIRST:
            pending = [chunk]
        elif rtype == _MIDDLE and pending is not None:
            pending.append(chunk)
        elif rtype == _LAST and pending is not None:
            pending.append(chunk)
            yield b"".join(pending)
            pending = None
        else:
            raise ValueError(f"{path}: unexpected record type {rtype} at byte {offset - length - 7}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value")
    return None if which in (None, "none") else getattr(item, which)


def _item_key(item: Any) -> str:
    # Flat keys ("vdm/bits_per_dim") arrive as one nested_key element; nested dicts as several.
    return ".".join(item.nested_key) if item.nested_key else item.key


def history_of_file(path: str | Path) -> list[dict[str, Any]]:
    """History rows of one ``.wandb`` file: ``{"_step": int, key: value, ...}`` in write order."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {_item_key(item): _item_value(item) for item in record.history.item}
        row.setdefault("_step", record.history.step.num)
        rows.append(row)
    return rows


def find_run_files(run_dir: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files under ``run_dir/wandb`` (one per segment of a resumed run),
    oldest segment first (by the run's start time recorded in the file, then path)."""
    root = RunDir(run_dir).wandb
    files = sorted(root.glob("*run-*/run-*.wandb"))

    def start_time(path: Path) -> tuple[float, str]:
        for record in iter_records(path):
            if record.WhichOneof("record_type") == "run":
                ts = record.run.start_time
                return (ts.seconds + ts.nanos * 1e-9, str(path))
        return (float("inf"), str(path))

    return sorted(files, key=start_time)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """History rows of every W&B segment of the run in ``run_dir``, oldest segment first.

    Each row is ``{"_step": int, "_timestamp": float, "_runtime": float, key: value, ...}``;
    images appear as their W&B JSON descriptors. Raises ``FileNotFoundError`` when the run
    directory has no W&B run file.
    """
    files = find_run_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no W&B run files (wandb/*run-*/run-*.wandb) under {run_dir}")
    rows: list[dict[str, Any]] = []
    for path in files:
        rows.extend(history_of_file(path))
    return rows
