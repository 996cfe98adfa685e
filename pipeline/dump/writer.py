"""The dump's writer thread: device arrays in through a bounded queue, records out to the cache.

The device loop `put`s (first index, ids, mask, features, valid rows, feature sums) with
`features` and their sums (pipeline/cache/feature_sums.py, computed on the device) possibly still
being computed; this thread blocks on the transfer, encodes each valid row and appends it
through a CacheWriter. A full queue makes the device loop wait (bounded host memory); an error
here (disk full) stops the loop at its next `put` and is re-raised there.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from pipeline.cache.format import BF16, encode_record
from pipeline.cache.writer import CacheWriter

_STOP = object()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


class WriterThread(threading.Thread):
    def __init__(self, writer: CacheWriter, max_batches: int, progress: bool, start_index: int,
                 total: int | None = None):
        super().__init__(name="dflash-cache-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.sequences = 0
        self.record_bytes = 0
        self._cancel = threading.Event()
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(desc="dump", unit="seq", initial=start_index, total=total,
                             dynamic_ncols=True, mininterval=1.0)
        self._t0 = time.perf_counter()

    def put(self, item) -> None:
        """Queue a batch; blocks while the queue is full; re-raises the writer's error."""
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every queued batch is written; re-raise the writer's error if any."""
        self.put(_STOP)
        self.join()
        self._close_bar()
        self._raise_if_failed()

    def abort(self, drain: bool = False) -> None:
        """Stop after the device loop failed, then drop uncommitted parts. With `drain`, first
        write the batches already queued (their commits are kept); without, stop at once."""
        if drain and self.error is None and self.is_alive():
            self.queue.put(_STOP)
        else:
            self._cancel.set()
            try:
                self.queue.put_nowait(_STOP)
            except queue.Full:
                pass
        self.join()
        self._close_bar()
        self.writer.abort()

    def run(self) -> None:
        try:
            while not self._cancel.is_set():
                item = self.queue.get()
                if item is _STOP:
                    return
                self._write_batch(*item)
        except BaseException as e:  # noqa: BLE001 - handed to the device loop
            self.error = e

    def _write_batch(self, index, ids, mask, feats, valid, sums=None) -> None:
        feats = np.asarray(feats)  # waits for the device
        sums = None if sums is None else np.asarray(sums)
        if feats.dtype != BF16:
            feats = feats.astype(BF16)
        if feats.shape[:2] != ids.shape:
            raise ValueError(f"teacher returned features {feats.shape} for a batch {ids.shape}")
        for r in range(valid):
            if self._cancel.is_set():
                return
            assert self.writer.next_index == index + r, (self.writer.next_index, index + r)
            record = encode_record(ids[r], mask[r], feats[r])
            self.writer.write(record, None if sums is None else sums[r])
            self.record_bytes += len(record)
        self.sequences += valid
        if self._bar is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(valid)
            self._bar.set_postfix_str(
                f"{self.sequences * ids.shape[1] / dt:,.0f} tok/s, "
                f"{_human_bytes(self.record_bytes)} written", refresh=False)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
