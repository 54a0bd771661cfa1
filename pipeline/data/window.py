"""Decoding the stream's windows in DataLoader workers (see :mod:`pipeline.data.stream`).

A worker reads a window's shards whole, indexes their tar headers, decodes only the
permuted samples it needs, and fills the slots of corrupt samples with the next valid
sample of the same window, so positions never depend on which samples were corrupt.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data import schema, storage, tario
from pipeline.data.plan import Piece, Plan
from pipeline.data.resolve import short_list

log = logging.getLogger("pipeline.data")


class Decoder:
    """Decodes windows in a worker: loads shards, fills corrupt slots, permutes."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.reported: set[str] = set()

    def _piece(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str]]:
        """(x, label, valid, reasons) of one shard piece; logs the shard's first corruption."""
        url = self.plan.urls[piece.shard]
        try:
            buf, reasons = tario.read_url(url), []
        except storage.Unreadable as e:  # retried already: its samples become corrupt slots
            buf, reasons = b"", [f"unreadable: {e}"]
        idx = tario.scan_tar(buf)
        n = len(piece)
        wanted = np.arange(piece.start, piece.stop)
        have = wanted < len(idx)  # samples past a truncation point do not exist
        if not reasons and (idx.problem or not have.all()):
            reasons.append(f"{url}: {idx.problem or 'fewer samples than the manifest lists'}")
        x, valid = self._samples(url, buf, idx, wanted, have, reasons)
        label = None if self.plan.label_key is None else self._labels(buf, idx, wanted, valid)
        bad = n - int(valid.sum())
        if bad and url not in self.reported:
            self.reported.add(url)
            why = "; ".join(reasons) or "undecodable or incomplete samples"
            log.warning("shard %s: %d of %d samples corrupt, skipped (%s)", url, bad, n, why)
        return x, label, valid, reasons

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

    def _decode(self, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        parts = [self._piece(p) for p in pieces]
        x = np.concatenate([p[0] for p in parts])
        label = None if self.plan.label_key is None else np.concatenate([p[1] for p in parts])
        valid = np.concatenate([p[2] for p in parts])
        return x, label, valid

    def window(self, epoch: int, w: int) -> dict[str, Any]:
        plan = self.plan
        retries_before = storage.retry_count()
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
                raise ValueError(f"no valid sample in any of the shards {short_list(shards)}")
            src = np.arange(n)
        out = {
            "epoch": epoch,
            "window": w,
            "x": torch.from_numpy(np.ascontiguousarray(x[src])),
            "substituted": torch.from_numpy(~valid),
            "storage_retries": storage.retry_count() - retries_before,  # this worker's, for this window
        }
        if label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(label[src]))
        return out


class WindowDataset(torch.utils.data.IterableDataset):
    """Infinite sequence of decoded windows from (epoch, window); worker k of K decodes the
    windows j with j % K == k, j counted from the start."""

    def __init__(self, plan: Plan, epoch: int, window: int):
        self.plan, self.epoch, self.window = plan, epoch, window

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = Decoder(self.plan)
        epoch, w, j = self.epoch, self.window, 0
        while True:
            windows = self.plan.windows(epoch)
            while w < len(windows):
                if j % nw == wid:
                    yield decoder.window(epoch, w)
                j += 1
                w += 1
            epoch, w = epoch + 1, 0
