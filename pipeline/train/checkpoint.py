"""Checkpoints: the one module that saves, validates and restores training state.

Layout under ``run_dir/checkpoints``::

    step-00000100/              one complete checkpoint
        manifest.json           step, world size, config hash, size + sha256 of every file
        ddp-<phase>/, ...       from the engine, each phase's model and optimizer (DDP, FSDP:
                                torch.distributed.checkpoint, a file per rank)
        <name>.pt               shared state (EMA, trainer counters), written by rank 0
        <name>-rank00001.pt     per-rank state (data stream position, RNG)
    latest                      text file naming the newest complete checkpoint directory

A checkpoint is written into ``.partial-step-...`` and renamed into place only once every
rank has written its files and the manifest is on disk, so a crash mid-write never leaves a
directory that looks complete; ``latest`` is replaced atomically afterwards. An asynchronous
checkpoint (``save_async``) is staged at its step, written in the background, and committed
the same way at a later step boundary once every rank's write is done. On restore the
manifest is checked (sizes and checksums); a corrupt or truncated checkpoint is reported and
the newest older valid one is used. Which step a checkpoint holds is read from its manifest,
never parsed from a file name.

Nothing is lost silently (docs/reliability.md):

- When checkpoints exist but none validates, restore raises :class:`NoValidCheckpointError`
  naming each one and why (the CLI exits 2); nothing is deleted or overwritten, and starting
  over is the user's explicit choice of a fresh ``run.dir``.
- Retention never deletes a checkpoint that does not validate while no newer valid one exists.
- On a world-size change, per-rank state cannot be mapped rank to rank. An :class:`Elastic`
  object (the data stream: its position is global) is given every old rank's state and
  continues exactly. A :class:`Reshardable` one (the per-rank RNGs) adopts rank 0's saved
  state as well as it can and says what was lost; the checkpointer emits that as a
  :class:`ResumeWarning`. An object that is neither stops the resume with an error.
- The manifest records the data position, ``"data": {"global_samples_consumed": N,
  "world_size": W, "epoch": E}``, so where a run stands can be read without loading tensors.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.atomic import atomic_write_text, fsync_dir as _fsync_dir
from pipeline.data.hashing import sha256_file as _sha256
from pipeline.errors import ConfigError
from pipeline.train.engines.base import Engine, PreparedPhase

MANIFEST = "manifest.json"
LATEST = "latest"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Reshardable(Stateful, Protocol):
    """Per-rank state that can resume on another world size."""

    def load_resharded(self, state: dict[str, Any], *, old_world_size: int, world_size: int, rank: int,
                       step: int, seed: int) -> str:
        """Adopt ``state`` (rank 0's, saved on ``old_world_size`` ranks) on ``rank`` of
        ``world_size``, deterministically from (seed, step, rank); return one clause saying
        what could not be carried over and what was done instead."""
        ...


@runtime_checkable
class Elastic(Stateful, Protocol):
    """Per-rank state whose meaning does not depend on the world size (e.g. a position in a
    global order): it resumes exactly on any world size from the states of all old ranks."""

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        """Adopt the states saved by the old ranks (``states[i]``: rank i's), exactly."""
        ...


class CheckpointError(RuntimeError):
    pass


class NoValidCheckpointError(CheckpointError, ConfigError):
    """Checkpoints exist and none validates. A ConfigError too, so the CLI reports it in one
    line with exit 2: the way out is the user's choice (a fresh ``run.dir``), never automatic."""


class ResumeWarning(UserWarning):
    """A resume could not restore some state exactly; the message says what and what was done."""


def validate(directory: Path) -> dict[str, Any]:
    """Return the manifest of a complete, intact checkpoint; raise CheckpointError otherwise."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{mpath}: no 'files' table (not a checkpoint manifest)")
    for name, info in files.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{directory}: file {name} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {info['size']} in the manifest (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: checksum does not match the manifest (corrupt)")
    return manifest


def manifest_step(directory: Path) -> int | None:
    """The step a checkpoint's manifest records (checkpoint not validated); None if none is readable."""
    try:
        return int(json.loads((directory / MANIFEST).read_text())["step"])
    except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError; OSError propagates
        return None


def _is_valid(directory: Path) -> bool:
    try:
        validate(directory)
    except CheckpointError:
        return False
    return True


@dataclass
class _Pending:
    step: int
    tmp: Path
    data: dict[str, int] | None
    futures: list[Future]  # this rank's background writes


def _own_state(shared: dict[str, Stateful], per_rank: dict[str, Stateful], rank: int) -> dict[str, Any]:
    """{file name: state} this rank writes: the shared state on rank 0, its own per-rank state."""
    out = {f"{key}.pt": obj.state_dict() for key, obj in shared.items()} if rank == 0 else {}
    return out | {f"{key}-rank{rank:05d}.pt": obj.state_dict() for key, obj in per_rank.items()}


def _write_state(tmp: Path, states: dict[str, Any], delay_s: float = 0.0) -> None:
    time.sleep(delay_s)
    for name, state in states.items():
        torch.save(state, tmp / name)


def _write_delay_s() -> float:
    """Tests only: ``PIPELINE_CHECKPOINT_WRITE_DELAY_S`` holds each background write back this
    long, so that a test can kill a rank while an asynchronous checkpoint is surely in flight."""
    return float(os.environ.get("PIPELINE_CHECKPOINT_WRITE_DELAY_S", "0"))


class Checkpointer:
    def __init__(
        self,
        root: Path,
        engine: Engine,
        *,
        keep_last: int,
        keep_every: int | None,
        config_hash: str,
        seed: int | None = None,
    ):
        """``seed``: the run's seed, from which per-rank state is re-derived when the world
        size changes (restoring onto another world size without it is an error)."""
        self.root = Path(root)
        self.engine = engine
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.config_hash = config_hash
        self.seed = seed
        self._pending: _Pending | None = None  # the asynchronous checkpoint in flight
        self._writer: ThreadPoolExecutor | None = None  # its shared and per-rank files
        if engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".partial-*"):  # left by a crash mid-write
                print(f"checkpoint: removing {stale.name}, an incomplete checkpoint left by a crash mid-write",
                      file=sys.stderr, flush=True)
                shutil.rmtree(stale, ignore_errors=True)
        engine.barrier()

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        phases: list[PreparedPhase],
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
        data: dict[str, int] | None = None,
    ) -> Path:
        """``data``: the data position for the manifest, ``{"global_samples_consumed": N,
        "world_size": W, "epoch": E}`` (rank 0's; all ranks consume alike)."""
        self.finalize()  # an asynchronous one still in flight counts first
        tmp = self._begin(step)
        for ph in phases:
            ph.save(tmp, self.engine.rank)
        _write_state(tmp, _own_state(shared, per_rank, self.engine.rank))
        return self._commit(step, tmp, data)

    def save_async(self, step: int, phases: list[PreparedPhase], shared: dict[str, Stateful],
                   per_rank: dict[str, Stateful], data: dict[str, int] | None = None) -> None:
        """``save``, with the writing in the background (``train.async_checkpoint``): every
        tensor is staged (copied) before this returns, so training may go on. The checkpoint
        counts only once :meth:`poll` or :meth:`finalize` has seen every rank's write done and
        renamed it into place; until then ``latest`` and retention do not see it."""
        self.finalize()
        tmp = self._begin(step)
        futures = [ph.save_async(tmp, self.engine.rank) for ph in phases]
        staged = copy.deepcopy(_own_state(shared, per_rank, self.engine.rank))  # tensors copied
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        futures.append(self._writer.submit(_write_state, tmp, staged, _write_delay_s()))
        self._pending = _Pending(step, tmp, data, futures)
        if self.engine.is_main:
            print(f"checkpoint: step {step} staged, writing in the background", file=sys.stderr, flush=True)

    def poll(self) -> Path | None:
        """At a step boundary, on every rank together: finalise the checkpoint in flight if
        every rank's write is done (one small all-reduce while one is in flight, none
        otherwise); return its path then, else None."""
        if self._pending is None:
            return None
        if self.engine.any_rank(not all(f.done() for f in self._pending.futures)):
            return None
        return self.finalize()

    def finalize(self) -> Path | None:
        """Wait for this rank's writes of the checkpoint in flight, agree with every rank that
        all succeeded, then commit it (manifest, rename, ``latest``, retention). None when
        nothing is in flight. Collective."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        errors = []
        for f in pending.futures:
            try:
                f.result()
            except Exception as e:  # reported below, on every rank together
                errors.append(f"{type(e).__name__}: {e}")
        if self.engine.any_rank(bool(errors)):
            if self.engine.is_main:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise CheckpointError(f"the asynchronous checkpoint of step {pending.step} failed on some rank "
                                  f"({'; '.join(errors) or 'not this one'}); the previous checkpoint stays latest")
        return self._commit(pending.step, pending.tmp, pending.data)

    def abandon(self) -> None:
        """The run stops with an error while a checkpoint is in flight: it is not committed (other
        ranks may be gone), its ``.partial-`` directory is removed at the next start."""
        if self._pending is not None and self.engine.is_main:
            print(f"checkpoint: step {self._pending.step} was still being written and does not count; "
                  f"{LATEST} names the last complete one", file=sys.stderr, flush=True)
        self._pending = None

    def _begin(self, step: int) -> Path:
        tmp = self.root / f".partial-step-{step:08d}"
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        return tmp

    def _commit(self, step: int, tmp: Path, data: dict[str, int] | None) -> Path:
        """Every rank has written its files into ``tmp``: rank 0 checksums them, writes the
        manifest, renames ``tmp`` into place, replaces ``latest``, applies retention."""
        eng = self.engine
        name = f"step-{step:08d}"
        final = self.root / name
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
            if data is not None:
                assert set(data) == {"global_samples_consumed", "world_size", "epoch"}, data
                manifest["data"] = dict(data)
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # same step saved again (e.g. preempted right after a save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._apply_retention(final)
        eng.barrier()
        return final

    def _complete(self) -> list[tuple[int, Path]]:
        out = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            m = d / MANIFEST
            if d.is_dir() and not d.name.startswith(".") and m.is_file():
                step = manifest_step(d)
                if step is None:
                    # Unreadable manifest: ordered by the directory's name, so that it is tried
                    # (and reported as skipped) in its place, not after an older valid one.
                    name_step = d.name.removeprefix("step-")
                    step = int(name_step) if name_step.isdigit() else -1
                out.append((step, d))
        return sorted(out, key=lambda x: x[0], reverse=True)

    def _apply_retention(self, just_saved: Path) -> None:
        """Newest ``keep_last`` plus every ``keep_every``-th, and never lose the last good state:
        the newest valid checkpoint stays, and so does a damaged one with nothing valid newer
        (it may be all that is left of the run; a person decides about it)."""
        done = self._complete()
        keep = {d for _, d in done[: self.keep_last]}
        if self.keep_every:
            keep |= {d for s, d in done if s > 0 and s % self.keep_every == 0}
        if all(d in keep for _, d in done):
            return

        def valid(d: Path) -> bool:  # the checkpoint just written was checksummed a moment ago
            return d == just_saved or _is_valid(d)

        newest_valid = next(((s, d) for s, d in done if valid(d)), None)
        if newest_valid is not None:
            keep.add(newest_valid[1])
        for s, d in done:
            if d in keep:
                continue
            if (newest_valid is None or s >= newest_valid[0]) and not valid(d):
                print(f"checkpoint: keeping {d.name} although it does not validate: no newer valid checkpoint",
                      file=sys.stderr, flush=True)
                continue
            shutil.rmtree(d, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------

    def find_latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint: ``latest`` first, then older ones, newest first.

        None when there is no checkpoint at all; :class:`NoValidCheckpointError`, naming each
        rejected checkpoint and why, when there are some and none validates."""
        candidates: list[Path] = []
        pointer = self.root / LATEST
        if pointer.is_file():
            candidates.append(self.root / pointer.read_text().strip())
        candidates += [d for _, d in self._complete() if d not in candidates]
        if candidates and not pointer.is_file():
            print(f"checkpoint: no {LATEST} file in {self.root}; trying the checkpoints newest first",
                  file=sys.stderr, flush=True)
        rejected = []
        for d in candidates:
            try:
                return d, validate(d)
            except CheckpointError as e:
                print(f"checkpoint: skipping {d.name}: {e}", file=sys.stderr, flush=True)
                rejected.append(f"  {d.name}: {e}")
        if rejected:
            raise NoValidCheckpointError(
                f"{self.root} holds {len(rejected)} checkpoint(s) and none validates:\n" + "\n".join(rejected)
                + "\nnothing was deleted; to start over, give a fresh run.dir (or move these away)"
            )
        return None

    def restore(
        self,
        phases: list[PreparedPhase],
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
    ) -> dict[str, Any] | None:
        """Load the newest valid checkpoint into everything; return its manifest, or None."""
        eng = self.engine
        choice: Any = None
        if eng.is_main:
            try:
                choice = self.find_latest_valid()
            except NoValidCheckpointError as e:
                choice = str(e)  # every rank raises it, so none waits on the others
        choice = eng.broadcast_object(choice)
        if isinstance(choice, str):
            raise NoValidCheckpointError(choice)
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
        self._restore_per_rank(directory, manifest, per_rank)
        eng.barrier()
        return manifest

    def _restore_per_rank(self, directory: Path, manifest: dict[str, Any], per_rank: dict[str, Stateful]) -> None:
        """Each rank's own state on the same world size. On another one: all old ranks' states
        for an :class:`Elastic` object (exact), rank 0's resharded by a :class:`Reshardable`
        one, with a :class:`ResumeWarning` saying what was lost. Never skipped."""
        eng = self.engine
        old_world = int(manifest["world_size"])
        same_world = old_world == eng.world_size
        lost = []
        for key, obj in per_rank.items():
            if same_world:
                obj.load_state_dict(self._load_rank_file(directory, manifest, key, eng.rank))
            elif isinstance(obj, Elastic):
                obj.load_elastic([self._load_rank_file(directory, manifest, key, r) for r in range(old_world)])
            elif isinstance(obj, Reshardable):
                if self.seed is None:
                    raise CheckpointError(f"{directory}: resuming {old_world} -> {eng.world_size} ranks needs the run seed")
                state = self._load_rank_file(directory, manifest, key, 0)
                lost.append(obj.load_resharded(state, old_world_size=old_world, world_size=eng.world_size,
                                               rank=eng.rank, step=int(manifest["step"]), seed=self.seed))
            else:
                self._load_rank_file(directory, manifest, key, 0)  # a missing file is named first
                raise CheckpointError(
                    f"{directory}: per-rank state {key!r} was saved on {old_world} ranks and cannot be "
                    f"carried onto {eng.world_size} ({type(obj).__name__} has neither load_elastic nor load_resharded)"
                )
        if lost and eng.is_main:
            warnings.warn(ResumeWarning(f"world size {old_world} -> {eng.world_size}: " + "; ".join(lost)),
                          stacklevel=3)

    @staticmethod
    def _load_rank_file(directory: Path, manifest: dict[str, Any], key: str, rank: int) -> dict[str, Any]:
        name = f"{key}-rank{rank:05d}.pt"
        if name not in manifest["files"]:
            raise CheckpointError(f"{directory}: holds no per-rank state {name} (this run saves {key!r})")
        return torch.load(directory / name, map_location="cpu", weights_only=True)
