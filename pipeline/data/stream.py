"""The training data stream: deterministic, resumable, equal batches on every rank.

Order of samples (a pure function of seed, epoch, rank, world_size and position):

1. Epoch ``e`` permutes the shards with ``SeedSequence([seed, e])`` - the same permutation on
   every rank - and lays their samples end to end: N samples in shard-major order.
2. Rank ``r`` takes the contiguous slice ``[r*M, (r+1)*M)`` with ``M = N // world_size``.
   The last ``N % world_size`` samples of the permuted order are dropped for that epoch
   (a different few each epoch), so every rank sees exactly ``M`` samples per epoch and
   every sample is seen at most once per epoch across ranks.
3. The rank's slice is cut into *windows*: runs of whole shard pieces holding at least
   ``shuffle_buffer`` samples. A window's samples are permuted with
   ``SeedSequence([seed, e, rank, window])``. This is the shuffle buffer: memory is bounded
   by a window (about ``shuffle_buffer`` + one shard), never by the data set.
4. Batches are consecutive runs of ``batch_per_rank`` samples of that sequence; a batch may
   straddle two windows or two epochs. The stream is infinite and every rank yields the
   same number of batches, so no rank waits on another.

Windows are the unit of work of DataLoader workers: window ``j`` (counting from where the
stream starts) is decoded by worker ``j % num_workers``, and the DataLoader returns results
in task order, so the order never depends on worker timing. A worker reads a window's
shards whole, indexes their tar headers, and decodes only the permuted samples it needs.

Resume: the state is the number of samples the rank has consumed. From it the epoch, window
and offset follow directly, so ``load_state_dict`` jumps there and decodes one window; it
does not replay what came before. All ranks consume the same number of samples, so the
state is the same on every rank.

Resume on another world size (:meth:`Stream.load_resharded`): a position in one world size's
order has no counterpart in another's, so the stream keeps the epoch count and restarts that
epoch from its start in a new order, seeded from (seed, step) so that it is not the run's
first order again. The checkpointer warns what was lost. ``global_samples_consumed`` (all
ranks together, over the whole run, across such changes) is what the manifest records.

Corrupt samples (a truncated shard, a member that is not a valid .npy, a missing field)
are never yielded: their slot is filled with the next valid sample of the same window (in
window order, cyclically), so positions - and hence resume - do not depend on which samples
were corrupt. Each filled slot counts once in ``corrupt_count``.

Modules: :mod:`pipeline.data.resolve` (which shards, their counts and meta),
:mod:`pipeline.data.plan` (steps 1-3 of the order), :mod:`pipeline.data.window` (decoding a
window in a worker, corrupt slots filled); this one holds the stream proper (step 4, resume).
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
from pipeline.data.plan import Plan
# resolve_shards, read_meta (and ShardSet, Decoder) are re-exported: callers import them from here.
from pipeline.data.resolve import ShardSet, read_meta, resolve_shards
from pipeline.data.window import Decoder, WindowDataset

__all__ = ["Decoder", "ShardSet", "Stream", "build_stream", "read_meta", "resolve_shards"]

log = logging.getLogger("pipeline.data")

_STATE_VERSION = 1


# ------------------------------------------------------------------------------ the stream


class Stream:
    """Infinite iterator over batches ``{"x": float32 [B, *shape], "label": ...}``."""

    def __init__(self, cfg: DataConfig, shard_set: ShardSet, meta: DataMeta, *, rank: int,
                 world_size: int, seed: int):
        self.cfg = cfg
        self.meta = meta
        self.shard_set = shard_set
        self.plan = Plan(
            urls=shard_set.urls, num_samples=shard_set.num_samples, seed=seed, rank=rank,
            world_size=world_size, window_samples=cfg.shuffle_buffer,
            sample_shape=tuple(meta.sample_shape), label_key=cfg.label_key,
        )
        self.batch_per_rank = cfg.batch_per_rank
        self._seed = seed  # the run's; plan.seed is the order's, which a world-size change reseeds
        self._position = 0  # samples consumed by this rank, in the current order
        self._global_base = 0  # global_samples_consumed at position 0 of the current order
        self._corrupt = 0
        self._storage_retries = 0  # transient object-store errors retried by the decoding workers
        self._loader_iter = None
        self._current: dict[str, Any] | None = None  # window being consumed
        self._offset = 0  # samples of _current already consumed

    # -- sizes
    @property
    def num_samples(self) -> int:
        """Samples in the shard set (all ranks)."""
        return sum(self.plan.num_samples)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees per epoch (``num_samples // world_size``)."""
        return self.plan.samples_per_rank

    @property
    def epoch(self) -> float:
        return self._position / self.plan.samples_per_rank

    @property
    def global_samples_consumed(self) -> int:
        """Samples consumed by all ranks together over the whole run."""
        return self._global_base + self._position * self.plan.world_size

    def position_record(self) -> dict[str, int]:
        """Where the stream stands, for a checkpoint manifest."""
        return {"global_samples_consumed": self.global_samples_consumed, "world_size": self.plan.world_size,
                "epoch": self._position // self.plan.samples_per_rank}

    @property
    def storage_retries(self) -> int:
        """Transient object-store errors retried while decoding (see pipeline.data.storage)."""
        return self._storage_retries

    @property
    def corrupt_count(self) -> int:
        """Batch slots filled by a substitute because the scheduled sample was corrupt."""
        return self._corrupt

    # -- iteration
    def __iter__(self) -> "Stream":
        return self

    def _start(self) -> None:
        epoch, window, offset = self.plan.locate(self._position)
        ds = WindowDataset(self.plan, epoch, window)
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
        self._offset = offset

    def _next_window(self) -> dict[str, Any]:
        window = next(self._loader_iter)
        self._storage_retries += int(window["storage_retries"])
        return window

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._loader_iter is None:
            self._start()
        need = self.batch_per_rank
        xs, labels, subs = [], [], []
        while need:
            cur = self._current
            n = len(cur["x"])
            if self._offset == n:
                self._current = self._next_window()
                self._offset = 0
                continue
            take = min(need, n - self._offset)
            sl = slice(self._offset, self._offset + take)
            xs.append(cur["x"][sl])
            subs.append(cur["substituted"][sl])
            if "label" in cur:
                labels.append(cur["label"][sl])
            self._offset += take
            need -= take
        self._position += self.batch_per_rank
        self._corrupt += int(torch.cat(subs).sum())
        batch = {"x": torch.cat(xs) if len(xs) > 1 else xs[0]}
        if self.cfg.label_key is not None:
            batch["label"] = torch.cat(labels) if len(labels) > 1 else labels[0]
        return batch

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "samples_consumed": self._position,
            "corrupt_count": self._corrupt,
            "seed": self._seed,
            "order_seed": self.plan.seed,
            "global_samples_consumed": self.global_samples_consumed,
            "world_size": self.plan.world_size,
            "num_samples": self.num_samples,
            "batch_per_rank": self.batch_per_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved stream was. If the world size, seed or data set
        changed, exact continuation is impossible: continue at the start of the next epoch
        (so no sample repeats within the epoch being run) and warn."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')!r} is not {_STATE_VERSION}")
        position = int(state["samples_consumed"])
        old_global = int(state.get("global_samples_consumed", position * int(state["world_size"])))
        same = (state["seed"], state["world_size"], state["num_samples"]) == (
            self._seed, self.plan.world_size, self.num_samples)
        self.plan.seed = int(state.get("order_seed", state["seed"])) if same else self._seed
        if not same:
            old_per_rank = max(1, int(state["num_samples"]) // int(state["world_size"]))
            next_epoch = -(-position // old_per_rank)
            warnings.warn(
                f"data stream state was saved with seed={state['seed']}, world_size="
                f"{state['world_size']}, num_samples={state['num_samples']}; now seed="
                f"{self.plan.seed}, world_size={self.plan.world_size}, num_samples="
                f"{self.num_samples}: continuing at the start of epoch {next_epoch}",
                stacklevel=2,
            )
            position = next_epoch * self.plan.samples_per_rank
        self.close()
        self._position = position
        self._global_base = old_global - position * self.plan.world_size if same else old_global
        self._corrupt = int(state.get("corrupt_count", 0))

    def load_resharded(self, state: dict[str, Any], *, old_world_size: int, world_size: int, rank: int,
                       step: int, seed: int) -> str:
        """Rank 0's state saved on ``old_world_size`` ranks, onto this rank of ``world_size``:
        keep the epoch, restart it in an order seeded from (seed, step); return what was lost."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')!r} is not {_STATE_VERSION}")
        assert (world_size, rank) == (self.plan.world_size, self.plan.rank), (world_size, rank)
        assert int(state["world_size"]) == old_world_size, (state["world_size"], old_world_size)
        old_position = int(state["samples_consumed"])
        old_per_rank = max(1, int(state["num_samples"]) // old_world_size)
        epoch, into = divmod(old_position, old_per_rank)
        self.close()
        self.plan.seed = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])
        self._position = epoch * self.plan.samples_per_rank
        old_global = int(state.get("global_samples_consumed", old_position * old_world_size))
        self._global_base = old_global - self._position * world_size
        self._corrupt = int(state.get("corrupt_count", 0))
        return (f"the data stream's position ({into} samples into epoch {epoch} of the old order) cannot be "
                f"mapped onto {world_size} rank(s); the stream restarts epoch {epoch} in a new order "
                f"seeded from (seed={seed}, step={step})")

    def close(self) -> None:
        """Stop the workers. The stream can be iterated again afterwards (it restarts them)."""
        it, self._loader_iter = self._loader_iter, None
        self._current = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


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
                 meta: DataMeta | None = None) -> Stream:
    """The batch stream of ``rank`` out of ``world_size`` for ``cfg.train_urls`` (or, with
    ``split="validation"``, ``cfg.val_urls``, defaulting to the validation shards of the
    ``train_urls`` manifest directory). ``meta``: the data's :func:`read_meta`, when the
    caller has it already (training reads it once, before the process group starts)."""
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
    return Stream(cfg, shard_set, meta, rank=rank, world_size=world_size, seed=seed)
