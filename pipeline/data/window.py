"""Decoding the stream's windows in DataLoader workers (see :mod:`pipeline.data.stream`).

A worker decodes only its rank's slots of a global window: it reads the shards holding one
of them whole, indexes their tar headers and decodes the members it needs. A corrupt
sample's slot is filled with the next valid sample of the same window (window order,
cyclically, over the whole window), so positions - and the substitutes - never depend on
which samples were corrupt, on the world size or on the rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data import schema, storage, tario
from pipeline.data.plan import Layout, Piece, Plan
from pipeline.data.resolve import short_list

log = logging.getLogger("pipeline.data")


class Decoder:
    """Decodes a rank's slots of windows in a worker: loads shards, fills corrupt slots."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.reported: set[str] = set()

    def _piece(self, piece: Piece, wanted: np.ndarray) -> _Decoded:
        """Samples ``wanted`` (indices within the shard) of one shard piece; logs the shard's
        first corruption."""
        url = self.plan.urls[piece.shard]
        try:
            buf, reasons = tario.read_url(url), []
        except storage.Unreadable as e:  # retried already: its samples become corrupt slots
            buf, reasons = b"", [f"unreadable: {e}"]
        idx = tario.scan_tar(buf)
        have = wanted < len(idx)  # samples past a truncation point do not exist
        if not reasons and (idx.problem or not have.all()):
            reasons.append(f"{url}: {idx.problem or 'fewer samples than the manifest lists'}")
        x, valid = self._samples(url, buf, idx, wanted, have, reasons)
        label = None if self.plan.label_key is None else self._labels(buf, idx, wanted, valid)
        keys = [idx.keys[i] if h else "" for i, h in zip(wanted.tolist(), have.tolist())]
        bad = len(wanted) - int(valid.sum())
        if bad and url not in self.reported:
            self.reported.add(url)
            why = "; ".join(reasons) or "undecodable or incomplete samples"
            log.warning("shard %s: %d of %d samples read corrupt, skipped (%s)", url, bad, len(wanted), why)
        return _Decoded(x, label, valid, keys)

    def _samples(self, url: str, buf: bytes, idx: tario.TarIndex, wanted: np.ndarray, have: np.ndarray,
                 reasons: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(x, valid) of samples ``wanted`` of the shard (``have``: those that exist), from
        .npy or else .png members; appends why the first mis-shaped .npy is not a sample."""
        plan = self.plan
        n = len(wanted)
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
            if have.all():  # the usual case: no copy (x, zeros, stays untouched)
                x, valid = xs, ok
            else:
                x[have], valid[have] = xs, ok
        return x, valid

    def _labels(self, buf: bytes, idx: tario.TarIndex, wanted: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The labels of samples ``wanted`` (``.cls``, or ``plan.label_key`` of the ``.json``);
        a sample whose label is missing or not a number is marked not ``valid``."""
        label_key = self.plan.label_key
        field = "cls" if label_key == "cls" else "json"
        label = np.zeros(len(wanted), dtype=np.int64 if field == "cls" else np.float32)
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
                    v = tario.decode_json(raw)[label_key]
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise TypeError(v)
                    label[j] = v
            except Exception:  # noqa: BLE001 - bad or missing label: corrupt sample
                valid[j] = False
        return label

    def _decode(self, pieces: list[Piece], ids: np.ndarray) -> _Decoded:
        """Samples ``ids`` (indices into the window's pieces laid end to end), in that order;
        only the shards holding one of them are read."""
        plan = self.plan
        stops = np.cumsum([len(p) for p in pieces])
        which = np.searchsorted(stops, ids, side="right")
        n = len(ids)
        out = _Decoded(
            x=np.zeros((n, *plan.sample_shape), dtype=np.float32),
            label=None if plan.label_key is None else np.zeros(n, np.int64 if plan.label_key == "cls" else np.float32),
            valid=np.zeros(n, dtype=bool), keys=[""] * n,
        )
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            piece = pieces[k]
            d = self._piece(piece, ids[sel] - (stops[k] - len(piece)) + piece.start)
            out.x[sel], out.valid[sel] = d.x, d.valid
            if out.label is not None:
                out.label[sel] = d.label
            for j, key in zip(sel.tolist(), d.keys):
                out.keys[j] = key
        return out

    def _filled(self, epoch: int, w: int) -> _Decoded:
        """All slots of window ``w`` in window order, a corrupt sample's slot filled with the
        next valid sample of the window at or after it, cyclically; a window with no valid
        sample borrows from the next windows of the same epoch. Defined over the whole window,
        so a slot's substitute does not depend on which rank decodes it."""
        plan = self.plan
        windows = plan.windows(epoch)
        n = sum(len(p) for p in windows[w])
        full = self._decode(windows[w], plan.window_order(epoch, w, n))
        good = np.flatnonzero(full.valid)
        if len(good):
            return full.take(good[np.searchsorted(good, np.arange(n)) % len(good)])
        for k in range(1, len(windows)):
            w2 = (w + k) % len(windows)
            other = self._decode(windows[w2], plan.window_order(epoch, w2, sum(len(p) for p in windows[w2])))
            good2 = np.flatnonzero(other.valid)
            if len(good2):
                return other.take(good2[np.arange(n) % len(good2)])
        shards = sorted({plan.urls[p.shard] for ws in windows for p in ws})
        raise ValueError(f"no valid sample in any of the shards {short_list(shards)}")

    def window(self, epoch: int, w: int, layout: Layout) -> dict[str, Any]:
        """The slots of window ``w`` that ``layout``'s rank takes, in global order: ``x``,
        ``label``, ``index`` (global positions), ``key`` (the sample's ``__key__``) and
        ``substituted`` (the slot's own sample was corrupt)."""
        plan = self.plan
        retries_before = storage.retry_count()
        pieces = plan.windows(epoch)[w]
        n = sum(len(p) for p in pieces)
        first = epoch * plan.samples_per_epoch + int(plan.window_starts(epoch)[w])
        mine = np.flatnonzero(layout.owns(first + np.arange(n)))
        d = self._decode(pieces, plan.window_order(epoch, w, n)[mine])
        substituted = ~d.valid
        if substituted.any():  # rare: decode the rest of the window for the substitutes
            d = self._filled(epoch, w).take(mine)
        out = {
            "epoch": epoch,
            "window": w,
            "x": torch.from_numpy(np.ascontiguousarray(d.x)),
            "index": torch.from_numpy(first + mine.astype(np.int64)),
            "key": d.keys,
            "substituted": torch.from_numpy(substituted),
            "storage_retries": storage.retry_count() - retries_before,  # this worker's, for this window
        }
        if d.label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(d.label))
        return out


@dataclass
class _Decoded:
    """Decoded samples: x [n, *shape], label [n] or None, valid [n], keys (n ``__key__``s)."""

    x: np.ndarray
    label: np.ndarray | None
    valid: np.ndarray
    keys: list[str]

    def take(self, i: np.ndarray) -> "_Decoded":
        return _Decoded(self.x[i], None if self.label is None else self.label[i], self.valid[i],
                        [self.keys[j] for j in i.tolist()])


class WindowDataset(torch.utils.data.IterableDataset):
    """Infinite sequence of a rank's decoded windows from (epoch, window); worker k of K
    decodes the windows j with j % K == k, j counted from the start (the DataLoader returns
    them in j order, so the order never depends on K)."""

    def __init__(self, plan: Plan, layout: Layout, epoch: int, window: int):
        self.plan, self.layout, self.epoch, self.window = plan, layout, epoch, window

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = Decoder(self.plan)
        epoch, w, j = self.epoch, self.window, 0
        while True:
            windows = self.plan.windows(epoch)
            while w < len(windows):
                if j % nw == wid:
                    yield decoder.window(epoch, w, self.layout)
                j += 1
                w += 1
            epoch, w = epoch + 1, 0
