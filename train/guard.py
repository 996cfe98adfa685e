"""Checks a run makes before it writes anything (bad --out, a manifest that is not an object, a
block that cannot fit the cache's sequences), the cache's content identity a resume must match,
and the stop on a non-finite loss, gradient or update (issue 11).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from pipeline.cache.format import CacheError
from pipeline.errors import UserError

_VIRTUAL_FS = ("/proc", "/sys")  # kernel views: writes there are not files (/dev/shm is fine)


class NonFiniteError(UserError):
    """A step produced a non-finite loss, gradient or update; nothing of it was saved."""


def check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file, sits under a file or a virtual filesystem, or whose nearest
    existing directory cannot be written; probes with a temporary file it removes at once."""
    path = Path(os.path.abspath(out))
    for v in _VIRTUAL_FS:
        if path == Path(v) or Path(v) in path.parents:
            raise UserError(f"--out {out} is under {v}, a kernel filesystem; choose a directory "
                            "on disk")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is an existing file" if existing == path else f"is under the file {existing}"
        raise UserError(f"--out {out} {what}; give a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


def manifest_object(path: Path) -> dict | None:
    """The JSON object in `path` (None when absent); one line when it is not a JSON object."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a valid cache manifest: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a valid cache manifest: it holds a JSON "
                        f"{type(d).__name__}, not an object")
    return d


def check_block_fits(block_size: int, seq_len: int) -> None:
    """Slot k of a block at anchor a targets token a + k and needs a + k < seq_len (a >= 0): with
    block_size > seq_len the last slots could never be supervised, so the draft never learns them."""
    if block_size > seq_len:
        raise UserError(f"--block-size {block_size} exceeds the cache's sequence length "
                        f"{seq_len}: slot k needs anchor + k < {seq_len}, so slots >= {seq_len} "
                        f"would never be trained; use --block-size <= {seq_len}")


def _parts_digest(d: dict) -> bytes:
    """sha256 of what identifies one cache's content: its settings and every part's name, record
    count, size and CRC32 (the dump's own checksums)."""
    key = {k: d.get(k) for k in ("settings", "parts", "seq_len", "layer_ids", "hidden_size",
                                 "dtype", "format", "num_records")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()


def cache_fingerprint(data_dir, manifest) -> str:
    """The cache's content identity, recorded in run.json and required equal on resume.

    A multi-process cache is the digests of its host sub-caches in host order; when each process
    reads only its own host (host-local storage), the digests are gathered from the processes."""
    data_dir = Path(data_dir)
    top = manifest_object(data_dir / "manifest.json") or {}
    n = int(manifest.hosts)
    if n <= 1:
        return _parts_digest(top).hex()
    from pipeline.cache.hosts import host_dirname

    def host(h: int) -> bytes:
        d = manifest_object(data_dir / host_dirname(h, n) / "manifest.json")
        if d is None:
            raise UserError(f"{data_dir}: host sub-cache {host_dirname(h, n)} has no manifest")
        return _parts_digest(d)

    if n == jax.process_count() > 1:
        from jax.experimental import multihost_utils
        mine = np.frombuffer(host(jax.process_index()), np.uint8)
        digests = np.asarray(multihost_utils.process_allgather(mine)).reshape(n, -1)
        joined = digests.astype(np.uint8).tobytes()
    else:
        joined = b"".join(host(h) for h in range(n))
    return hashlib.sha256(_parts_digest(top) + joined).hexdigest()


class CorruptFeaturesError(CacheError):
    """A step's features did not match the feature sums the dump wrote."""


class FiniteWatch:
    """Collects each step's on-device flags without waiting for them: finiteness, and with a
    cache's feature sums which rows' features matched them. `check()` (at log, eval and save
    points, which sync anyway) raises for the first bad step since the last, so nothing trained
    on it is ever saved, evaluated or exported."""

    def __init__(self, directory=None, describe=None):
        """`describe(record) -> str` names a cache record in the error (the reader's)."""
        self._pending: list = []
        self._directory, self._describe = directory, describe or (lambda i: f"cache record {i}")

    def add(self, step: int, metrics: dict, records=None) -> None:
        """`records`: this process's sequence indices of the step's batch rows (for the error)."""
        self._pending.append((step, metrics["finite"], metrics["loss"], metrics["grad_norm"],
                              metrics.get("features_ok"), records))

    def check(self, last_saved: int | None) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = jax.device_get([(p[1], p[4]) for p in pending])
        for (step, _, loss, gnorm, _, records), (ok, rows_ok) in zip(pending, flags):
            kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved
                    else "no checkpoint was saved")
            if rows_ok is not None and not np.all(rows_ok):
                bad = np.flatnonzero(~np.asarray(rows_ok))
                what = ("; ".join(self._describe(int(records[r])) for r in bad[:4])
                        if records is not None and len(records) == len(rows_ok)
                        else f"batch row(s) {', '.join(map(str, bad[:8]))}")
                raise CorruptFeaturesError(
                    f"step {step}: {what} is corrupted: its features do not match the feature "
                    f"sums written by the dump; stopped without saving, evaluating or exporting "
                    f"anything trained on it, {kept}. Check the cache "
                    f"with `python -m pipeline.cache.verify {self._directory or '<cache dir>'}` "
                    "and re-dump the bad parts")
            if not bool(ok):
                raise NonFiniteError(
                    f"step {step}: non-finite loss, gradient or update (loss {float(loss)}, "
                    f"grad norm {float(gnorm)}); stopped without saving or exporting it, {kept}; "
                    "lower --lr or check the cache")
