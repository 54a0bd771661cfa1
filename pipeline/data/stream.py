"""The training data stream: one global order for any world size, resumable, equal batches.

Order of samples: a pure function of (seed, epoch, global position), the same for every
``world_size``, ``num_workers`` and split of the global batch into ranks x micro steps
(MosaicML Streaming's "elastic determinism"):

1. Epoch ``e`` permutes the shards with ``SeedSequence([seed, e])`` and lays their samples
   end to end: N samples in shard-major order. Nothing is dropped: the global sequence is
   the concatenation of all epochs, infinite; global position ``p`` is offset ``p % N`` of
   epoch ``p // N``.
2. The epoch is cut into global *windows*: runs of whole shards holding at least
   ``shuffle_buffer`` samples. A window's samples are permuted with
   ``SeedSequence([seed, e, 0, window])``. This is the shuffle buffer: memory is bounded by
   a window (about ``shuffle_buffer`` + one shard), never by the data set.
3. Rank ``r`` of ``W``, ``batch_per_rank = B``: its k-th micro batch is global positions
   ``k*W*B + r*B + [0, B)`` (counted from where the stream started or resumed), so
   optimizer step s with A accumulation micro steps is positions ``[s*G, (s+1)*G)``,
   ``G = W*A*B``, laid out micro step-major, rank-minor (:class:`pipeline.data.plan.Layout`).
   A batch may straddle two windows or two epochs; every rank yields the same number of
   batches, so no rank waits on another. With one process this is exactly the order of the
   per-rank layout this one replaced.

Windows are the unit of work of DataLoader workers: the rank's window ``j`` (counting from
where the stream starts) is decoded by worker ``j % num_workers``, and the DataLoader returns
results in task order, so the order never depends on worker timing. A worker decodes only
its rank's slots of a window: it reads only the shards holding one of them and decodes only
those members (the tar index says where they are).

Each batch holds ``x``, ``label`` (with ``data.label_key``), ``index`` (int64 global
positions) and, with ``with_keys=True``, ``key`` (the samples' ``__key__``; a list, so off in
training, whose batches must hold tensors only).

Resume: the state is ``global_samples_consumed`` (positions consumed by all ranks). From it
the epoch, window and offset follow, so ``load_state_dict`` jumps there on any world size
and ``batch_per_rank`` and decodes one window; it does not replay what came before. If
``world_size x batch_per_rank`` changed, the stream continues at exactly that global
position (nothing repeated or skipped) and says so in one line. If the seed or the data set
(the shards' sample counts) changed, no position of the old order has a counterpart: the
stream continues at the start of the next epoch and warns. States of version 1 (the per-rank
order) are converted when saved on one process, where both orders agree; otherwise refused.

Corrupt samples (a truncated shard, a member that is not a valid .npy, a missing field)
are never yielded: their slot is filled with the next valid sample of the same window (in
window order, cyclically, defined over the whole window, so the substitute does not depend
on the world size). Each filled slot counts once in the rank's ``corrupt_count``.

Modules: :mod:`pipeline.data.resolve` (which shards, their counts and meta),
:mod:`pipeline.data.plan` (steps 1-3 of the order), :mod:`pipeline.data.window` (decoding a
rank's slots of a window in a worker, corrupt slots filled); this one holds the stream proper
(batches, resume).
"""

from __future__ import annotations

import logging
import signal
import warnings
from typing import Any

import numpy as np
import torch

from pipeline.data import schema
from pipeline.data.config import DataConfig
from pipeline.data.meta import DataMeta
from pipeline.data.plan import Layout, Plan
# resolve_shards, read_meta (and ShardSet, Decoder) are re-exported: callers import them from here.
from pipeline.data.resolve import ShardSet, read_meta, resolve_shards
from pipeline.data.window import Decoder, WindowDataset
from pipeline.errors import ConfigError

__all__ = ["Decoder", "ShardSet", "Stream", "build_stream", "read_meta", "resolve_shards"]

log = logging.getLogger("pipeline.data")

_STATE_VERSION = 2


# ------------------------------------------------------------------------------ the stream


class Stream:
    """Infinite iterator over batches ``{"x": float32 [B, *shape], "label": ..., "index": int64 [B]}``
    of rank ``rank`` out of ``world_size`` in the global order (module docstring)."""

    def __init__(self, cfg: DataConfig, shard_set: ShardSet, meta: DataMeta, *, rank: int,
                 world_size: int, seed: int, with_keys: bool = False):
        self.cfg = cfg
        self.meta = meta
        self.shard_set = shard_set
        self.plan = Plan(
            urls=shard_set.urls, num_samples=list(shard_set.num_samples), seed=seed,
            window_samples=cfg.shuffle_buffer, sample_shape=tuple(meta.sample_shape), label_key=cfg.label_key,
        )
        self.rank, self.world_size = rank, world_size
        self.batch_per_rank = cfg.batch_per_rank
        self.with_keys = with_keys
        self._start_position = 0  # global position the layout counts from: 0, or where it resumed
        self._batches = 0  # micro batches this rank has taken since then
        self._corrupt = 0
        self._storage_retries = 0  # transient object-store errors retried by the decoding workers
        self._loader_iter = None
        self._current: dict[str, Any] | None = None  # window being consumed
        self._offset = 0  # samples of _current already consumed

    # -- sizes and position
    @property
    def num_samples(self) -> int:
        """Samples in the shard set (all ranks)."""
        return self.plan.samples_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Global positions per epoch (all ranks together): every sample once, none dropped."""
        return self.plan.samples_per_epoch

    @property
    def layout(self) -> Layout:
        return Layout(self._start_position, self.rank, self.world_size, self.batch_per_rank)

    @property
    def global_samples_consumed(self) -> int:
        """Global positions consumed by all ranks together: the next global batch starts here."""
        return self._start_position + self._batches * self.world_size * self.batch_per_rank

    @property
    def epoch(self) -> float:
        return self.global_samples_consumed / self.samples_per_epoch

    def position_record(self) -> dict[str, int]:
        """Where the stream stands, for a checkpoint manifest."""
        g = self.global_samples_consumed
        return {"global_samples_consumed": g, "world_size": self.world_size, "epoch": g // self.samples_per_epoch}

    @property
    def storage_retries(self) -> int:
        """Transient object-store errors retried while decoding (see pipeline.data.storage)."""
        return self._storage_retries

    @property
    def corrupt_count(self) -> int:
        """This rank's batch slots filled by a substitute because the scheduled sample was corrupt."""
        return self._corrupt

    # -- iteration
    def __iter__(self) -> "Stream":
        return self

    def _start(self) -> None:
        layout = self.layout
        position = layout.position(self._batches * self.batch_per_rank)  # this rank's next sample
        epoch, window = self.plan.locate(position)
        first = epoch * self.samples_per_epoch + int(self.plan.window_starts(epoch)[window])
        ds = WindowDataset(self.plan, layout, epoch, window)
        nw = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=nw, prefetch_factor=2 if nw else None,
            persistent_workers=False,
            # A DataLoader iterator draws its workers' base seed from this generator, or from the
            # global torch RNG without one; that draw would shift the training noise of a resumed
            # run against an uninterrupted one. Decoding is seeded per window, not per worker.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_job_signals,
        )
        self._loader_iter = iter(loader)
        self._current = self._next_window()
        # The window yields this rank's slots from its first; skip those before `position`.
        self._offset = int(layout.owns(np.arange(first, position)).sum())

    def _next_window(self) -> dict[str, Any]:
        window = next(self._loader_iter)
        self._storage_retries += int(window["storage_retries"])
        return window

    def __next__(self) -> dict[str, Any]:
        if self._loader_iter is None:
            self._start()
        need = self.batch_per_rank
        parts: list[tuple[dict[str, Any], slice]] = []
        while need:
            cur = self._current
            n = len(cur["x"])
            if self._offset == n:
                self._current = self._next_window()
                self._offset = 0
                continue
            take = min(need, n - self._offset)
            parts.append((cur, slice(self._offset, self._offset + take)))
            self._offset += take
            need -= take
        self._batches += 1
        self._corrupt += sum(int(cur["substituted"][sl].sum()) for cur, sl in parts)
        fields = ["x", "index"] + (["label"] if self.cfg.label_key is not None else [])
        batch: dict[str, Any] = {f: _cat([cur[f][sl] for cur, sl in parts]) for f in fields}
        if self.with_keys:
            batch["key"] = [k for cur, sl in parts for k in cur["key"][sl]]
        return batch

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "global_samples_consumed": self.global_samples_consumed,
            "seed": self.plan.seed,
            "shard_num_samples": list(self.plan.num_samples),
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "rank": self.rank,
            "batch_per_rank": self.batch_per_rank,
            "corrupt_count": self._corrupt,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly at the saved global position, on any world size and batch_per_rank.
        If the seed or the data set changed, continue at the start of the next epoch and warn."""
        state = _upgrade(state, self.plan.num_samples)
        position = int(state["global_samples_consumed"])
        old_split = (int(state["world_size"]), int(state["batch_per_rank"]))
        if (int(state["seed"]), list(state["shard_num_samples"])) != (self.plan.seed, self.plan.num_samples):
            position = self._next_epoch_start(state, position)
        elif old_split != (self.world_size, self.batch_per_rank) and self.rank == 0:
            w0, b0 = old_split
            if w0 * b0 != self.world_size * self.batch_per_rank:  # one line, on rank 0 only
                warnings.warn(
                    f"data stream: samples per micro step over all ranks (world_size x batch_per_rank) changed "
                    f"from {w0} x {b0} = {w0 * b0} to {self.world_size} x {self.batch_per_rank} = "
                    f"{self.world_size * self.batch_per_rank}; continuing exactly at global sample {position} "
                    f"(nothing repeated or skipped)", stacklevel=2)
        self.close()
        self._start_position, self._batches = position, 0
        self._corrupt = int(state.get("corrupt_count", 0))

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        """The states of all ranks of a run on another world size (``states[i]``: rank i's).
        They stand at the same global position, so the stream continues exactly there; rank 0
        carries the old ranks' corrupt counts (the loop sums the ranks')."""
        positions = sorted({int(s["global_samples_consumed"]) for s in states})
        if len(positions) != 1:
            raise ValueError(f"the {len(states)} saved data stream states disagree on global_samples_consumed "
                             f"({positions}); the checkpoint is inconsistent")
        self.load_state_dict(states[0])
        self._corrupt = sum(int(s.get("corrupt_count", 0)) for s in states) if self.rank == 0 else 0

    def _next_epoch_start(self, state: dict[str, Any], position: int) -> int:
        """The seed or the data set changed: no position of the old order has a counterpart
        in the new one. Continue at the start of the next epoch (so no sample repeats within
        the epoch being run) and warn what was lost."""
        old = list(state["shard_num_samples"])
        next_epoch = -(-position // max(1, sum(old)))
        if self.rank == 0:
            warnings.warn(
                f"data stream state was saved with seed={state['seed']}, {len(old)} shard(s) of "
                f"{sum(old)} samples; now seed={self.plan.seed}, {len(self.plan.num_samples)} shard(s) of "
                f"{self.num_samples} samples: the old order has no counterpart in this one; continuing at "
                f"the start of epoch {next_epoch}", stacklevel=3)
        return next_epoch * self.num_samples

    def close(self) -> None:
        """Stop the workers. The stream can be iterated again afterwards (it restarts them)."""
        it, self._loader_iter = self._loader_iter, None
        self._current = None
        if it is not None and self.cfg.num_workers > 0:
            # A DataLoader with workers has no public way to stop them before its iterator is
            # garbage-collected; torch's own __del__ calls this (torch/utils/data/dataloader.py).
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _upgrade(state: dict[str, Any], shard_num_samples: list[int]) -> dict[str, Any]:
    """A saved state in the current version. Version 1 (per-rank slices) is convertible only
    when saved on one process in the run's first order: there both orders agree sample for
    sample. Any other version 1 state is refused: placing it would misplace the stream."""
    version = state.get("version")
    if version == _STATE_VERSION:
        return state
    if version != 1:
        raise ConfigError(f"data stream state version {version!r} is not 1 or {_STATE_VERSION}")
    if int(state["world_size"]) != 1 or int(state.get("order_seed", state["seed"])) != int(state["seed"]):
        raise ConfigError(
            f"data stream state version 1 saved on {state['world_size']} rank(s)"
            f"{'' if int(state['world_size']) != 1 else ' after a world-size change'}: its per-rank order has "
            "no counterpart in the global order of this version; resume with the version that wrote it, "
            "or start a fresh run.dir")
    same_total = int(state["num_samples"]) == sum(shard_num_samples)
    return {
        "version": _STATE_VERSION, "global_samples_consumed": int(state["samples_consumed"]),
        "seed": int(state["seed"]),
        "shard_num_samples": list(shard_num_samples) if same_total else [int(state["num_samples"])],
        "world_size": 1, "rank": 0, "batch_per_rank": int(state["batch_per_rank"]),
        "corrupt_count": int(state.get("corrupt_count", 0)),
    }


def _ignore_job_signals(worker_id: int) -> None:
    """DataLoader workers ignore the scheduler's stop signals (SIGTERM, SIGUSR1).

    SLURM (``scancel``, time limit), ``timeout`` and Kubernetes signal every process of the job,
    workers included. A worker killed by it makes the main process raise "DataLoader worker
    ... is killed by signal: Terminated" before it can write its preemption checkpoint. The
    main process decides what a signal means (PreemptionFlag in pipeline/train/loop.py) and
    stops the workers normally (Stream.close); a worker whose main process dies anyway exits
    by the DataLoader's own parent watchdog. Seeds nothing: decoding is seeded per window."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_stream(cfg: DataConfig, *, rank: int, world_size: int, seed: int, split: str = "train",
                 meta: DataMeta | None = None, with_keys: bool = False) -> Stream:
    """The batch stream of ``rank`` out of ``world_size`` for ``cfg.train_urls`` (or, with
    ``split="validation"``, ``cfg.val_urls``, defaulting to the validation shards of the
    ``train_urls`` manifest directory). ``meta``: the data's :func:`read_meta`, when the
    caller has it already (training reads it once, before the process group starts).
    ``with_keys``: batches also hold ``key``, the samples' ``__key__`` (for auditing the order)."""
    cfg.validate()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    urls = cfg.train_urls if split == "train" else (cfg.val_urls or cfg.train_urls)
    shard_set = resolve_shards(urls, split=split, verify_mode=cfg.verify)
    meta = meta if meta is not None else (shard_set.meta or read_meta(urls))
    schema.check_label_key(cfg.label_key, shard_set.schema, urls)
    n = sum(shard_set.num_samples)
    if n < world_size:
        raise ValueError(f"{urls} has {n} samples, fewer than world_size={world_size}")
    if cfg.label_key is not None and meta.label_kind == "none" and shard_set.meta is not None:
        # Allowed (e.g. temperature of a single-temperature set), but worth knowing.
        log.info("data.label_key=%r on a data set whose manifest declares no label", cfg.label_key)
    return Stream(cfg, shard_set, meta, rank=rank, world_size=world_size, seed=seed, with_keys=with_keys)
