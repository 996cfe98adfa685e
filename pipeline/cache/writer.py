"""Writes a feature cache: part files in layout order, ledger commits, crash-safe resume.

Protocol (see pipeline/cache/format.py for the layout):
  1. manifest.json (settings, complete=false) is written before any record;
  2. records are appended in sequence order; a part is closed and fsynced when full;
  3. at each interval end the ledger is replaced atomically, naming every closed part;
  4. at the end the ledger and then the manifest are marked complete.
On resume, files the ledger does not name are deleted, the committed parts are verified, and
writing restarts at the first uncommitted sequence (an interval boundary).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import signal
from pathlib import Path

from pipeline.cache.format import LEDGER_NAME, MANIFEST_NAME, CacheManifest, PartInfo, part_filename
from pipeline.errors import UserError
from pipeline.cache.ledger import Ledger, atomic_write_json, fsync_dir

# Test hook: "after_record:N,before_ledger:M,..." makes the writer SIGKILL its own process at
# that point (after_record: record N written, its part still open; after_close: a part closed
# with N records written in all; before_ledger / after_ledger: around the commit of N records).
# "fail_write:N" makes the write of record N fail with ENOSPC (disk full without a small mount).
KILL_ENV = "DFLASH_DUMP_KILL"


def _raise(error: BaseException):
    raise error


class CacheWriteError(UserError):
    """Writing the cache failed (disk full, I/O error); the ledger still holds the last commit."""


def _kill_points() -> set[tuple[str, int]]:
    spec = os.environ.get(KILL_ENV, "")
    points = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        points.add((name, int(n)))
    return points


class CacheWriter:
    """Appends encoded records, in sequence order, to a cache prepared by `prepare_cache`."""

    def __init__(self, directory: Path, manifest: CacheManifest, ledger: Ledger, store):
        self.directory = Path(directory)
        self.manifest = manifest
        self.layout = manifest.layout
        self.ledger = ledger
        self.store = store  # ArrayRecord files or TensorStore parts: the one prepare_cache built
        self.parts = list(ledger.parts)
        self.next_index = ledger.committed
        self.bytes_written = 0  # part bytes closed by this process
        self._open = None  # [writer, where, shard, part, records, name]
        self._pending = []  # (closed part, its CRC future), resolved at the next commit
        self._crc_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dflash-crc")
        self._kill = _kill_points()

    def _maybe_kill(self, point: str, n: int) -> None:
        if (point, n) in self._kill:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, record: bytes, feature_sums=None) -> None:
        """Append the record of sequence `self.next_index` (with its feature sums when the
        caller computed them on the device: pipeline/cache/feature_sums.py)."""
        if len(record) != self.manifest.record_nbytes:
            raise ValueError(f"record of {len(record)} bytes, expected {self.manifest.record_nbytes}")
        index = self.next_index
        shard, part, pos = self.layout.locate(index)
        if pos == 0:
            name = part_filename(shard, part, self.layout.shards, self.manifest.format)
            where = self.store.where(name)
            self._open = [self._io(lambda: self.store.open_writer(name, self.layout.per_part),
                                   where), where, shard, part, 0, name]
        state = self._open
        if ("fail_write", index) in self._kill:
            self._io(lambda: _raise(OSError(errno.ENOSPC, "No space left on device (injected)")),
                     state[1])
        self._io(lambda: self.store.write(state[0], record, feature_sums), state[1])
        state[4] += 1
        self.next_index = index + 1
        self._maybe_kill("after_record", index)
        if pos + 1 == self.layout.per_part or self.layout.is_commit_point(self.next_index):
            self._close_part()
        if self.layout.is_commit_point(self.next_index):
            self._commit(complete=False)

    def finish(self) -> CacheManifest:
        """Close the last part and mark ledger and manifest complete; returns the manifest."""
        if self._open is not None:
            self._close_part()
        self._commit(complete=True)
        self._crc_pool.shutdown()
        manifest = self.manifest.with_parts(self.parts, complete=True)
        self._io(lambda: atomic_write_json(self.directory / MANIFEST_NAME, manifest.to_json()),
                 self.directory / MANIFEST_NAME)
        return manifest

    def abort(self) -> None:
        """After a failure: drop the open part and the uncommitted parts (their space is wasted)."""
        if self._open is not None:
            try:
                self._open[0].close()
            except Exception:  # noqa: BLE001 - already failing; the file is deleted below
                pass
            self._open = None
        for _, crc in self._pending:
            crc.cancel()
        self._pending = []
        self._crc_pool.shutdown(wait=True)
        committed = {p.file for p in self.ledger.parts}
        for name in self.store.names() - committed:
            self.store.delete(name)

    def _close_part(self) -> None:
        writer, where, shard, part, records, name = self._open
        self._io(lambda: self.store.close(writer, name), where)
        self._open = None
        # (size, CRC) of the closed part (read back from the page cache) covers every byte.
        # zlib releases the GIL: it runs beside the next part's writes, joined at the commit.
        crc = self._crc_pool.submit(self.store.checksum, name)
        self._pending.append((PartInfo(shard, part, name, records, 0, 0), crc))
        self._maybe_kill("after_close", self.next_index)

    def _commit(self, complete: bool) -> None:
        for info, crc in self._pending:
            size, crc32 = self._io(crc.result, self.store.where(info.file))
            self.bytes_written += size
            self.parts.append(dataclasses.replace(info, bytes=size, crc32=crc32))
        self._pending = []
        n = self.next_index
        ledger = Ledger(self.ledger.settings_key, n, tuple(self.parts), complete)
        path = self.directory / LEDGER_NAME

        def save():
            fsync_dir(self.directory)  # the new part files' directory entries are durable
            ledger.save(self.directory, before_replace=lambda: self._maybe_kill("before_ledger", n))

        self._io(save, path)
        self.ledger = ledger
        self._maybe_kill("after_ledger", n)

    @staticmethod
    def _io(fn, path):
        try:
            return fn()
        except (OSError, RuntimeError, ValueError) as e:  # array_record: RuntimeError, TS: ValueError
            msg = " ".join(str(e).split())
            if len(msg) > 300:
                msg = msg[:300] + "..."
            raise CacheWriteError(
                f"writing {path} failed: {msg} (free space or fix the problem, then rerun the "
                "same command to resume from the last commit)") from e
