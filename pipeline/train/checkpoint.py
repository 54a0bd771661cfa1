"""Checkpoints: the one module that saves, validates and restores training state.

Layout under ``run_dir/checkpoints``::

    step-00000100/              one complete checkpoint
        manifest.json           step, world size, config hash, size + sha256 of every file
        model-<phase>.pt        from the engine (sharded per rank where the backend shards)
        optim-<phase>.pt
        <name>.pt               shared state (EMA, trainer counters), written by rank 0
        <name>-rank00001.pt     per-rank state (data stream position, RNG)
    latest                      text file naming the newest complete checkpoint directory

A checkpoint is written into ``.partial-step-...`` and renamed into place only once every
rank has written its files and the manifest is on disk, so a crash mid-write never leaves a
directory that looks complete; ``latest`` is replaced atomically afterwards. On restore the
manifest is checked (sizes and checksums); a corrupt or truncated checkpoint is reported and
the newest older valid one is used. Which step a checkpoint holds is read from its manifest,
never parsed from a file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.train.engines.base import Engine, PreparedPhase

MANIFEST = "manifest.json"
LATEST = "latest"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


def validate(directory: Path) -> dict[str, Any]:
    """Return the manifest of a complete, intact checkpoint; raise CheckpointError otherwise."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    for name, info in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{directory}: file {name} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {info['size']} in the manifest (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: checksum does not match the manifest (corrupt)")
    return manifest


class Checkpointer:
    def __init__(
        self,
        root: Path,
        engine: Engine,
        *,
        keep_last: int,
        keep_every: int | None,
        config_hash: str,
    ):
        self.root = Path(root)
        self.engine = engine
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.config_hash = config_hash
        if engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".partial-*"):  # left by a crash mid-write
                shutil.rmtree(stale, ignore_errors=True)
        engine.barrier()

    # -- save -------------------------------------------------------------------------

    def save(
        self,
        step: int,
        phases: list[PreparedPhase],
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
    ) -> Path:
        eng = self.engine
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self.root / f".partial-{name}"
        if eng.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        eng.barrier()
        for ph in phases:
            ph.save(tmp, eng.rank)
        if eng.is_main:
            for key, obj in shared.items():
                torch.save(obj.state_dict(), tmp / f"{key}.pt")
        for key, obj in per_rank.items():
            torch.save(obj.state_dict(), tmp / f"{key}-rank{eng.rank:05d}.pt")
        eng.barrier()
        if eng.is_main:
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
            manifest = {
                "step": step,
                "world_size": eng.world_size,
                "config_hash": self.config_hash,
                "time": time.time(),
                "files": files,
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # same step saved again (e.g. preempted right after a save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._apply_retention()
        eng.barrier()
        return final

    def _complete(self) -> list[tuple[int, Path]]:
        out = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            m = d / MANIFEST
            if d.is_dir() and not d.name.startswith(".") and m.is_file():
                try:
                    out.append((int(json.loads(m.read_text())["step"]), d))
                except (json.JSONDecodeError, KeyError, ValueError):
                    out.append((-1, d))  # unreadable manifest: oldest, validated (and rejected) last
        return sorted(out, key=lambda x: x[0], reverse=True)

    def _apply_retention(self) -> None:
        done = self._complete()
        keep = {d for _, d in done[: self.keep_last]}
        if self.keep_every:
            keep |= {d for s, d in done if s > 0 and s % self.keep_every == 0}
        for _, d in done:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------

    def find_latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint: ``latest`` first, then older ones, newest first."""
        candidates: list[Path] = []
        pointer = self.root / LATEST
        if pointer.is_file():
            candidates.append(self.root / pointer.read_text().strip())
        candidates += [d for _, d in self._complete() if d not in candidates]
        for d in candidates:
            try:
                return d, validate(d)
            except CheckpointError as e:
                print(f"checkpoint: skipping {d.name}: {e}", file=sys.stderr, flush=True)
        return None

    def restore(
        self,
        phases: list[PreparedPhase],
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
    ) -> dict[str, Any] | None:
        """Load the newest valid checkpoint into everything; return its manifest, or None."""
        eng = self.engine
        choice = eng.broadcast_object(self.find_latest_valid() if eng.is_main else None)
        if choice is None:
            return None
        directory, manifest = Path(choice[0]), choice[1]
        if manifest["config_hash"] != self.config_hash:
            print(
                f"checkpoint: {directory.name} was written with config hash {manifest['config_hash']}, "
                f"this run has {self.config_hash}; resuming anyway (the config changed).",
                file=sys.stderr,
                flush=True,
            )
        for ph in phases:
            ph.load(directory, eng.rank)
        for key, obj in shared.items():
            obj.load_state_dict(torch.load(directory / f"{key}.pt", map_location="cpu", weights_only=True))
        same_world = manifest["world_size"] == eng.world_size
        for key, obj in per_rank.items():
            path = directory / f"{key}-rank{eng.rank:05d}.pt"
            if same_world and path.is_file():
                obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            elif hasattr(obj, "load_resharded_state"):
                # World size changed: the object re-derives its own state from rank 0's.
                state0 = torch.load(directory / f"{key}-rank00000.pt", map_location="cpu", weights_only=True)
                obj.load_resharded_state(state0, manifest["world_size"])
        eng.barrier()
        return manifest
