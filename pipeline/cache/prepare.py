"""Start, resume or recognise as finished a cache in a directory, before any record is written.

`prepare_cache(dir, manifest, overwrite)` returns a `Prepared`: either `complete` (a finished
cache with the same settings: nothing to do, once `cache_verify.check_complete` passes) or a
`writer` positioned at the first uncommitted sequence. Settings that differ from the existing
cache's are refused (--overwrite starts over); committed parts that fail verification are
reported, never silently reused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
from pathlib import Path

from pipeline.cache.format import (
    _PROGRESS_KEYS, LEDGER_NAME, MANIFEST_NAME, CacheError, CacheManifest, load_manifest, settings_key)
from pipeline.cache.arrayrecord import ArrayRecordParts
from pipeline.cache.parts import part_store
from pipeline.cache.writer import CacheWriter, CacheWriteError
from pipeline.errors import UserError
from pipeline.cache.ledger import Ledger, atomic_write_json

@dataclasses.dataclass
class Prepared:
    manifest: CacheManifest
    writer: CacheWriter | None  # None when the cache is already complete
    resumed_from: int = 0  # sequences already committed by earlier runs

    @property
    def complete(self) -> bool:
        return self.writer is None


def _differences(old: CacheManifest, new: CacheManifest) -> str:
    a = {k: v for k, v in old.to_json().items() if k not in _PROGRESS_KEYS}
    b = {k: v for k, v in new.to_json().items() if k not in _PROGRESS_KEYS}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key == "settings":
            sa, sb = a.get(key, {}), b.get(key, {})
            diffs += [f"{k}: {sa.get(k)!r} -> {sb.get(k)!r}"
                      for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        elif a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    text = "; ".join(diffs)
    return text if len(text) < 400 else text[:400] + "..."


def remove_cache_files(directory: Path, manifest: CacheManifest | None = None) -> None:
    """Delete this cache's own files only (the directory may hold other things, e.g. models/):
    the parts of the cache on disk (its manifest names their format and root), of `manifest`'s
    format and root (a rerun may change the format), then the manifest and ledger."""
    directory = Path(directory)
    manifests = [manifest] if manifest is not None else []
    if (directory / MANIFEST_NAME).exists():
        try:
            manifests.append(load_manifest(directory))
        except CacheError:
            pass
    stores = [part_store(directory, m) for m in manifests if m.format != "arrayrecord"]
    stores.append(ArrayRecordParts(directory, None))  # listing and deleting files needs no manifest
    for store in stores:
        for name in store.names():
            store.delete(name)
    for name in (MANIFEST_NAME, LEDGER_NAME, MANIFEST_NAME + ".tmp", LEDGER_NAME + ".tmp"):
        (directory / name).unlink(missing_ok=True)


def existing_format(directory) -> str | None:
    """The part format of the cache already in `directory` (single- or multi-process: any
    host sub-cache's manifest), None when there is none or it is unreadable. A dump run without
    --format resumes in it, whatever the default is now."""
    directory = Path(directory)
    for path in [directory / MANIFEST_NAME, *sorted(directory.glob("host-*/" + MANIFEST_NAME))]:
        if path.is_file():
            try:
                return load_manifest(path.parent).format
            except (CacheError, OSError):
                continue
    return None


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".dflash-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise UserError(f"cannot write the cache to {directory}: {reason}") from e


@contextlib.contextmanager
def lock_cache(directory):
    """Hold an exclusive lock on the cache directory: two dumps never write one cache."""
    directory = Path(directory)
    _ensure_writable(directory)
    with open(directory / ".dump.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another dump is writing to {directory}; wait for it or stop it") from None
        yield


def prepare_cache(directory, manifest: CacheManifest, *, overwrite: bool = False,
                  verify: bool = True) -> Prepared:
    """Create, resume or recognise a cache; see the module docstring."""
    directory = Path(directory)
    _ensure_writable(directory)
    if overwrite:
        remove_cache_files(directory, manifest)
    store = part_store(directory, manifest)  # built once; the writer carries it on
    key = settings_key(manifest)
    if (directory / MANIFEST_NAME).exists():
        old = load_manifest(directory)
        if settings_key(old) != key:
            raise UserError(
                f"{directory} holds a cache made with other settings ({_differences(old, manifest)})"
                "; rerun with --overwrite to start over, or choose another --out")
        ledger = Ledger.load(directory) or Ledger(key)
        if old.complete:  # the dump verifies it before calling it complete (cache_verify.py)
            return Prepared(old, None, old.num_records)
    else:
        stray = sorted(store.names())
        if stray or (directory / LEDGER_NAME).exists():
            raise UserError(f"{directory} holds cache files but no {MANIFEST_NAME}; rerun with "
                            "--overwrite to start over")
        ledger = Ledger(key)
        try:
            atomic_write_json(directory / MANIFEST_NAME, manifest.to_json())
            ledger.save(directory)
        except OSError as e:
            raise CacheWriteError(f"starting the cache in {directory} failed: {e}") from e
    # Anything the ledger does not name is a leftover of an interrupted interval.
    for name in store.names() - {p.file for p in ledger.parts}:
        store.delete(name)
    for name in (MANIFEST_NAME + ".tmp", LEDGER_NAME + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    if verify:
        for part in ledger.parts:
            try:
                store.verify(part)
            except CacheError as e:
                raise CacheError(f"cannot resume: {e}; rerun with --overwrite to start over") from e
    writer = CacheWriter(directory, manifest, ledger, store)
    if ledger.complete:  # crashed between the ledger's and the manifest's final commit
        writer.finish()
        return Prepared(load_manifest(directory), None, ledger.committed)
    return Prepared(manifest, writer, ledger.committed)

