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
"""

from __future__ import annotations

import logging
import signal
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data import schema, tario
from pipeline.data.config import DataConfig
from pipeline.data.meta import DataMeta
from pipeline.data.shards import MANIFEST_NAME, meta_from_dict, read_manifest, verify
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.data")

_STATE_VERSION = 1


# --------------------------------------------------------------------------- shard sets


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: list[int]  # per shard
    meta: DataMeta | None  # from a manifest, when there is one
    manifest_dir: Path | None
    schema: dict[str, Any] | None = None  # the manifest's sample schema, when there is one


def _find_manifest(urls: str) -> Path | None:
    p = Path(urls)
    if p.name == MANIFEST_NAME and p.is_file():
        return p.parent
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return p
    return None


def _expand(urls: str) -> list[str]:
    import braceexpand

    # As in webdataset, braces expand in pipe: commands too: one command per shard.
    return list(braceexpand.braceexpand(urls))


def resolve_shards(urls: str, *, split: str = "train", verify_mode: str = "size") -> ShardSet:
    """The shards behind ``urls`` and their sample counts.

    ``urls``: a directory holding manifest.json (its ``split`` shards), a manifest.json path,
    a tar path, brace notation, or a ``pipe:`` command. Shards listed in a manifest next to
    them get their counts from it; other shards are scanned once here to count samples.
    """

    if not urls:
        raise ConfigError("data.train_urls is empty; give a shard directory, tar path(s) or a pipe: command")
    mdir = _find_manifest(urls)
    if mdir is not None:
        m = read_manifest(mdir)
        shards = [s for s in m["shards"] if s["split"] == split]
        if not shards:
            have = sorted({s["split"] for s in m["shards"]})
            raise ValueError(f"{mdir / MANIFEST_NAME} lists no {split!r} shards (it has {have})")
        for s in shards:
            if not (mdir / s["name"]).is_file():
                raise ConfigError(f"shard {mdir / s['name']} listed in {mdir / MANIFEST_NAME} is missing")
        if verify_mode != "off":
            for problem in verify(mdir, checksum=verify_mode == "sha256", split=split):
                # The stream still runs: damaged samples are skipped and counted.
                warnings.warn(f"{problem}; its damaged samples will be skipped", stacklevel=2)
                log.warning("%s; its damaged samples will be skipped", problem)
        return ShardSet(
            urls=[str(mdir / s["name"]) for s in shards],
            num_samples=[int(s["num_samples"]) for s in shards],
            meta=meta_from_dict(m["meta"]),
            manifest_dir=mdir,
            schema=m.get("schema"),
        )
    if Path(urls).is_dir():
        raise ConfigError(
            f"{urls} is a directory without {MANIFEST_NAME}; give shard paths instead "
            f"(e.g. {urls}/shard-{{000000..000009}}.tar)"
        )
    expanded = _expand(urls)
    local = [u for u in expanded if not u.startswith("pipe:")]
    if expanded == [urls] and local and not Path(urls.removeprefix("file:")).exists():
        raise ConfigError(
            f"data set {urls} does not exist: expected a directory holding {MANIFEST_NAME} "
            "(written by `pipeline shards`), a .tar shard, brace notation or a pipe: command"
        )
    for u in local:
        if not Path(u.removeprefix("file:")).is_file():
            raise ConfigError(f"shard {u} does not exist")
    # A manifest next to the shards supplies counts and meta when it lists all of them.
    meta = manifest_dir = None
    counts: dict[str, int] = {}
    if local and len(local) == len(expanded):
        parent = Path(local[0].removeprefix("file:")).parent
        if (parent / MANIFEST_NAME).is_file():
            try:
                m = read_manifest(parent)
                listed = {str(parent / s["name"]): int(s["num_samples"]) for s in m["shards"]}
                names = [str(parent / Path(u.removeprefix("file:")).name) for u in local]
                if all(n in listed for n in names):
                    counts = {u: listed[n] for u, n in zip(local, names)}
                    meta, manifest_dir = meta_from_dict(m["meta"]), parent
            except ValueError:
                pass
    num = []
    for u in expanded:
        if u not in counts:
            counts[u] = len(tario.scan_tar(tario.read_url(u)))
        num.append(counts[u])
    if sum(num) == 0:
        raise ValueError(f"no samples in any of the shards {_names(expanded)}")
    return ShardSet(urls=expanded, num_samples=num, meta=meta, manifest_dir=manifest_dir)


def _names(urls: list[str], k: int = 5) -> str:
    return ", ".join(urls[:k]) + (f" and {len(urls) - k} more" if len(urls) > k else "")


def read_meta(urls: str) -> DataMeta:
    """What a model needs to know about the data at ``urls`` (see :class:`DataMeta`).

    From the manifest when there is one. Otherwise inferred from the first shard with a
    warning: sample shape from the first decodable sample, values {-1,+1} -> spins,
    non-negative integers -> levels, else continuous; no label."""
    mdir = _find_manifest(urls)
    if mdir is not None:
        return meta_from_dict(read_manifest(mdir)["meta"])
    shard_set = resolve_shards(urls, verify_mode="off")
    if shard_set.meta is not None:
        return shard_set.meta
    for url in shard_set.urls:
        buf = tario.read_url(url)
        idx = tario.scan_tar(buf)
        values = []
        for i in range(len(idx)):
            x = _decode_one(buf, idx, i)
            if x is not None and (not values or x.shape == values[0].shape):
                values.append(x)
        if values:
            v = np.stack(values)
            if np.isin(v, (-1, 1)).all():
                kind, levels = "spins", None
            elif np.all(v == np.round(v)) and v.min() >= 0:
                kind, levels = "levels", int(v.max()) + 1
            else:
                kind, levels = "continuous", None
            meta = DataMeta(sample_shape=tuple(v.shape[1:]), data_kind=kind, num_levels=levels)
            warnings.warn(
                f"{urls}: no {MANIFEST_NAME}; inferred {meta} from {len(v)} samples of {url}",
                stacklevel=2,
            )
            return meta
    raise ValueError(f"no decodable sample in any of the shards {_names(shard_set.urls)}")


def _decode_one(buf: bytes, idx: tario.TarIndex, i: int) -> np.ndarray | None:
    """Sample ``i``'s x without a known shape (only used to infer meta)."""
    import io

    try:
        if idx.offset["npy"][i] >= 0:
            o, s = int(idx.offset["npy"][i]), int(idx.size["npy"][i])
            a = np.load(io.BytesIO(buf[o:o + s]), allow_pickle=False)
            return a if a.dtype.kind in "biuf" else None
        if idx.offset["png"][i] >= 0:
            o, s = int(idx.offset["png"][i]), int(idx.size["png"][i])
            return tario.decode_png(buf[o:o + s])
    except Exception:  # noqa: BLE001 - any undecodable member is just not a sample
        return None
    return None


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the shard list
    start: int  # first sample index within the shard
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class _Plan:
    """Pure functions from (seed, epoch, rank, world_size) to the rank's windows."""

    urls: list[str]
    num_samples: list[int]
    seed: int
    rank: int
    world_size: int
    window_samples: int
    sample_shape: tuple[int, ...]
    label_key: str | None

    @property
    def samples_per_rank(self) -> int:
        return sum(self.num_samples) // self.world_size

    def windows(self, epoch: int) -> list[list[Piece]]:
        return _windows(
            tuple(self.num_samples), self.seed, epoch, self.rank, self.world_size, self.window_samples
        )

    def window_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, window]))
        return rng.permutation(n)

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, offset) of the rank's ``position``-th sample."""
        epoch, q = divmod(position, self.samples_per_rank)
        for w, pieces in enumerate(self.windows(epoch)):
            n = sum(len(p) for p in pieces)
            if q < n:
                return epoch, w, q
            q -= n
        raise AssertionError("position beyond the epoch")


@lru_cache(maxsize=4)
def _windows(num_samples: tuple[int, ...], seed: int, epoch: int, rank: int, world_size: int,
             window_samples: int) -> list[list[Piece]]:
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(num_samples))
    per_rank = sum(num_samples) // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    windows: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    start = 0  # position of the current shard's first sample in the epoch's order
    for s in order:
        n = num_samples[s]
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            current.append(Piece(int(s), a - start, b - start))
            filled += b - a
            if filled >= window_samples:
                windows.append(current)
                current, filled = [], 0
        start += n
        if start >= hi:
            break
    if current:
        windows.append(current)
    return windows


class _Decoder:
    """Decodes windows in a worker: loads shards, fills corrupt slots, permutes."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.reported: set[str] = set()

    def _piece(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str]]:
        plan = self.plan
        url = plan.urls[piece.shard]
        buf = tario.read_url(url)
        idx = tario.scan_tar(buf)
        n = len(piece)
        wanted = np.arange(piece.start, piece.stop)
        have = wanted < len(idx)  # samples past a truncation point do not exist
        reasons = []
        if idx.problem or not have.all():
            reasons.append(f"{url}: {idx.problem or 'fewer samples than the manifest lists'}")
        x = np.zeros((n, *plan.sample_shape), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        hw = wanted[have]
        if len(hw):
            npy_off = idx.offset["npy"][hw]
            xs, ok = tario.decode_npy_batch(buf, npy_off, idx.size["npy"][hw], plan.sample_shape)
            bad_npy = np.flatnonzero(~ok & (npy_off >= 0))
            if len(bad_npy):  # name why, from the first such member (e.g. another shape)
                i = hw[bad_npy[0]]
                why = schema.npy_mismatch(buf, int(idx.offset["npy"][i]), int(idx.size["npy"][i]), plan.sample_shape)
                if why:
                    reasons.append(f"{url} sample {idx.keys[i]!r} key npy: {why}")
            # Samples stored as PNG instead of .npy.
            for j in np.flatnonzero((npy_off < 0) & (idx.offset["png"][hw] >= 0)):
                i = hw[j]
                o, s = int(idx.offset["png"][i]), int(idx.size["png"][i])
                try:
                    a = tario.decode_png(buf[o:o + s])
                except Exception:  # noqa: BLE001 - an undecodable image is a corrupt sample
                    continue
                if a.shape == plan.sample_shape:
                    xs[j], ok[j] = a, True
            x[have], valid[have] = xs, ok
        label = None
        if plan.label_key is not None:
            field = "cls" if plan.label_key == "cls" else "json"
            label = np.zeros(n, dtype=np.int64 if field == "cls" else np.float32)
            for j in np.flatnonzero(valid):
                i = wanted[j]
                o, s = int(idx.offset[field][i]), int(idx.size[field][i])
                if o < 0:
                    valid[j] = False
                    continue
                try:
                    raw = buf[o:o + s]
                    if field == "cls":
                        label[j] = tario.decode_cls(raw)
                    else:
                        v = tario.decode_json(raw)[plan.label_key]
                        if isinstance(v, bool) or not isinstance(v, (int, float)):
                            raise TypeError(v)
                        label[j] = v
                except Exception:  # noqa: BLE001 - bad or missing label: corrupt sample
                    valid[j] = False
        bad = n - int(valid.sum())
        if bad and url not in self.reported:
            self.reported.add(url)
            why = "; ".join(reasons) or "undecodable or incomplete samples"
            log.warning("shard %s: %d of %d samples corrupt, skipped (%s)", url, bad, n, why)
        return x, label, valid, reasons

    def _decode(self, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        parts = [self._piece(p) for p in pieces]
        x = np.concatenate([p[0] for p in parts])
        label = None if self.plan.label_key is None else np.concatenate([p[1] for p in parts])
        valid = np.concatenate([p[2] for p in parts])
        return x, label, valid

    def window(self, epoch: int, w: int) -> dict[str, Any]:
        plan = self.plan
        windows = plan.windows(epoch)
        x, label, valid = self._decode(windows[w])
        order = plan.window_order(epoch, w, len(x))
        x, valid = x[order], valid[order]
        label = None if label is None else label[order]
        n = len(x)
        good = np.flatnonzero(valid)
        if len(good) == len(x):
            src = np.arange(n)
        elif len(good):
            # Slot i takes the next valid sample at or after i, cyclically within the window.
            src = good[np.searchsorted(good, np.arange(n)) % len(good)]
        else:
            # Nothing valid here: borrow from the next windows of the same epoch (cyclically).
            for k in range(1, len(windows)):
                w2 = (w + k) % len(windows)
                x2, label2, valid2 = self._decode(windows[w2])
                o2 = plan.window_order(epoch, w2, len(x2))
                good2 = o2[valid2[o2]]
                if len(good2):
                    take = good2[np.arange(n) % len(good2)]
                    x = x2[take]
                    label = None if label2 is None else label2[take]
                    break
            else:
                shards = sorted({plan.urls[p.shard] for ws in windows for p in ws})
                raise ValueError(f"no valid sample in any of the shards {_names(shards)}")
            src = np.arange(n)
        out = {
            "epoch": epoch,
            "window": w,
            "x": torch.from_numpy(np.ascontiguousarray(x[src])),
            "substituted": torch.from_numpy(~valid),
        }
        if label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(label[src]))
        return out


class _WindowDataset(torch.utils.data.IterableDataset):
    """Infinite sequence of decoded windows from (epoch, window); worker k of K decodes the
    windows j with j % K == k, j counted from the start."""

    def __init__(self, plan: _Plan, epoch: int, window: int):
        self.plan, self.epoch, self.window = plan, epoch, window

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = _Decoder(self.plan)
        epoch, w, j = self.epoch, self.window, 0
        while True:
            windows = self.plan.windows(epoch)
            while w < len(windows):
                if j % nw == wid:
                    yield decoder.window(epoch, w)
                j += 1
                w += 1
            epoch, w = epoch + 1, 0


# ------------------------------------------------------------------------------ the stream


class Stream:
    """Infinite iterator over batches ``{"x": float32 [B, *shape], "label": ...}``."""

    def __init__(self, cfg: DataConfig, shard_set: ShardSet, meta: DataMeta, *, rank: int,
                 world_size: int, seed: int):
        self.cfg = cfg
        self.meta = meta
        self.shard_set = shard_set
        self.plan = _Plan(
            urls=shard_set.urls, num_samples=shard_set.num_samples, seed=seed, rank=rank,
            world_size=world_size, window_samples=cfg.shuffle_buffer,
            sample_shape=tuple(meta.sample_shape), label_key=cfg.label_key,
        )
        self.batch_per_rank = cfg.batch_per_rank
        self._seed = seed  # the run's; plan.seed is the order's, which a world-size change reseeds
        self._position = 0  # samples consumed by this rank, in the current order
        self._global_base = 0  # global_samples_consumed at position 0 of the current order
        self._corrupt = 0
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
    def corrupt_count(self) -> int:
        """Batch slots filled by a substitute because the scheduled sample was corrupt."""
        return self._corrupt

    # -- iteration
    def __iter__(self) -> "Stream":
        return self

    def _start(self) -> None:
        epoch, window, offset = self.plan.locate(self._position)
        ds = _WindowDataset(self.plan, epoch, window)
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
        self._current = next(self._loader_iter)
        self._offset = offset

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._loader_iter is None:
            self._start()
        need = self.batch_per_rank
        xs, labels, subs = [], [], []
        while need:
            cur = self._current
            n = len(cur["x"])
            if self._offset == n:
                self._current = next(self._loader_iter)
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
