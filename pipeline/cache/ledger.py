"""Crash-safe progress ledger of a cache being written: atomic JSON files and the commit record.

A ledger names the settings it belongs to, how many sequences are committed, and every closed
part (records, bytes, CRC32). It is replaced atomically (tmp file + fsync + os.replace + fsync of
the directory), so after a crash at any instant the ledger on disk is either the old or the new
one, and every part it names was closed and fsynced before it was written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pipeline.cache.format import LEDGER_NAME, CacheError, PartInfo, read_json
from pipeline.errors import UserError

LEDGER_VERSION = 1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj, before_replace=None, indent: int | None = 1) -> None:
    """Write obj as JSON to `path` so that readers see the old or the new file, never a mix.

    `before_replace` (tests only) runs after the tmp file is durable and before the rename.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(obj, indent=indent, sort_keys=True).encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclasses.dataclass(frozen=True)
class Ledger:
    """Progress of one dump: `committed` sequences live in `parts`; `complete` once finished."""

    settings_key: str  # hash of the dump settings; a rerun with other settings is refused
    committed: int = 0
    parts: tuple[PartInfo, ...] = ()
    complete: bool = False

    def to_json(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "settings_key": self.settings_key,
            "committed": self.committed,
            "complete": self.complete,
            "parts": [p.to_list() for p in self.parts],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Ledger":
        if d.get("version") != LEDGER_VERSION:
            raise ValueError(f"unknown ledger version {d.get('version')!r}")
        return cls(
            settings_key=str(d["settings_key"]),
            committed=int(d["committed"]),
            parts=tuple(PartInfo.from_list(r) for r in d["parts"]),
            complete=bool(d["complete"]),
        )

    def save(self, directory: Path, before_replace=None) -> None:
        # Compact: the ledger is rewritten at every commit and lists every part.
        atomic_write_json(Path(directory) / LEDGER_NAME, self.to_json(), before_replace, indent=None)

    @classmethod
    def load(cls, directory: Path) -> "Ledger | None":
        path = Path(directory) / LEDGER_NAME
        if not path.exists():
            return None
        try:
            return cls.from_json(read_json(path))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is unreadable ({e}); re-dump the cache (pipeline.teacher_dump "
                            "--overwrite) to start over") from e


def committed_parts(directory, manifest, allow_incomplete: bool = False) -> tuple:
    """The parts a reader may read: all of a finished cache's; of an unfinished dump, what its
    ledger committed (only when allow_incomplete), else a CacheError."""
    if manifest.complete:
        return manifest.parts
    if allow_incomplete:
        ledger = Ledger.load(directory)
        return ledger.parts if ledger is not None else ()
    raise CacheError(f"the cache at {directory} is incomplete: rerun the pipeline.teacher_dump "
                     "command that wrote it to finish it")
