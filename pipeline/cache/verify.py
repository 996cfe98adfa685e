"""Check a whole feature cache and report every bad part.

    python -m pipeline.cache.verify /dev/shm/dflash          # exit 0: every part is intact
    python -m pipeline.teacher_dump --verify --out /dev/shm/dflash   # the same check

Every committed part (ArrayRecord file or TensorStore zarr3 part, every host of a multi-process
cache; an unfinished dump's ledger-committed parts) is read whole and compared with the size,
CRC32 and record count the dump committed. Each bad part is printed on its own line; the exit
code is 1 when any part is bad, 2 when DIR holds no readable cache. A rerun of the dump on a
finished cache runs the same check before it calls the cache complete (pipeline/dump/run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipeline.cache.format import CacheManifest, PartInfo
from pipeline.cache.hosts import host_dirname
from pipeline.cache.parts import part_store
from pipeline.cache.format import CacheError, load_manifest
from pipeline.errors import UserError
from pipeline.cache.ledger import Ledger


@dataclasses.dataclass(frozen=True)
class BadPart:
    where: str  # the part's file or key prefix, or the sub-cache that could not be opened
    reason: str


def _committed_parts(directory: Path, manifest: CacheManifest) -> tuple[PartInfo, ...]:
    if manifest.complete:
        return manifest.parts
    ledger = Ledger.load(directory)
    return ledger.parts if ledger is not None else ()


def _sub_caches(directory: Path) -> list[tuple[Path, CacheManifest | None, str | None]]:
    """(directory, manifest or None, why not) of each single-host cache under `directory`."""
    top = load_manifest(directory)
    if top.hosts <= 1:
        return [(directory, top, None)]
    out = []
    for h in range(top.hosts):
        sub = directory / host_dirname(h, top.hosts)
        try:
            out.append((sub, load_manifest(sub), None))
        except CacheError as e:
            out.append((sub, None, str(e)))
    return out


def verify_cache(directory, *, progress: bool = False, parts_of=None) -> list[BadPart]:
    """Every bad part of the cache in `directory` (empty: intact). `parts_of(dir, manifest)`
    chooses the parts to check (default: the committed ones)."""
    directory = Path(directory)
    parts_of = parts_of or _committed_parts
    subs = _sub_caches(directory)
    work = [(d, m, p) for d, m, _ in subs if m is not None for p in parts_of(d, m)]
    bad = [BadPart(str(d), why) for d, m, why in subs if m is None]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(p.bytes for _, _, p in work), desc="verify", unit="B",
                   unit_scale=True, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    stores = {}
    for d, m, part in work:
        store = stores.setdefault(d, part_store(d, m))
        try:
            store.verify(part)
        except CacheError as e:
            bad.append(BadPart(store.where(part.file), str(e)))
        except OSError as e:  # unreadable (permissions, I/O error): a bad part, not a traceback
            bad.append(BadPart(store.where(part.file), f"{store.where(part.file)}: {e}"))
        if bar is not None:
            bar.update(part.bytes)
    if bar is not None:
        bar.close()
    return bad


def bad_parts_message(directory, bad: list[BadPart]) -> str:
    first = bad[0].reason
    more = f" (and {len(bad) - 1} more part(s))" if len(bad) > 1 else ""
    return f"{first}{more}; `python -m pipeline.cache.verify {directory}` lists every bad part"


def check_complete(directory) -> None:
    """Raise CacheError unless every part of the finished cache in `directory` verifies (the
    dump's rerun on a finished cache: a corrupt one is never called complete)."""
    bad = verify_cache(directory)
    if bad:
        raise CacheError(f"the cache at {directory} is complete but {len(bad)} part(s) are "
                         f"corrupted: {bad_parts_message(directory, bad)}; rerun with --overwrite "
                         "to re-dump it")


def run(directory, *, progress: bool = True, out=None) -> int:
    """Check the cache, print one line per bad part (or one OK line); the exit code."""
    out = out or sys.stdout
    bad = verify_cache(directory, progress=progress)
    for b in bad:
        print(f"bad part: {b.reason}", file=out)
    if bad:
        print(f"{len(bad)} bad part(s) in {directory}; re-dump them (rerun the dump with "
              "--overwrite)", file=out)
        return 1
    print(f"ok: every part of {directory} matches its committed size and checksum", file=out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.cache.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="the cache directory (holds manifest.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        return run(a.directory, progress=not a.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
