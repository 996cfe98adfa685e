"""A full disk (or quota) while the trainer writes: one `error:` line instead of the tracebacks of
Orbax's writer threads, and the temporary checkpoint directories such a failure leaves behind are
removed when the next run starts (Orbax only ignores them).

Before each save the free space of --out's filesystem is compared with what the save writes
(`check_space`): a disk that filled up during training is refused in one line before Orbax starts
writing, and nothing half-written is left. A disk that fills *during* a save (another process
writing) still fails inside Orbax; its threads' absl ERROR records of the no-space error are
dropped (`quiet_no_space`) and the run ends with the same one line, but TensorStore's callbacks may
print "Event loop is closed" tracebacks from C that Python cannot intercept.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step (or item) not yet committed


def is_no_space(exc: BaseException) -> bool:
    """True when `exc` or anything it was raised from is a full disk or quota (Orbax and
    TensorStore wrap the OSError, sometimes only as text)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def no_space_message(out) -> str:
    steps = [int(p.name) for p in (Path(out) / "checkpoints").glob("*") if p.name.isdigit()]
    saved_step = max(steps, default=None)
    kept = (f"the last committed checkpoint (step {saved_step}) is kept" if saved_step
            else "no checkpoint was committed")
    return (f"no space left on the device holding --out {out}; {kept}: free space and rerun "
            "the same command to resume")


def remove_stale_tmp(checkpoint_dir) -> list[str]:
    """Delete the uncommitted (temporary) step directories of an earlier, interrupted save; the
    names removed. Called before Orbax opens the directory, by the run that holds the lock."""
    d = Path(checkpoint_dir)
    gone = []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if TMP_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def check_space(directory, need_bytes: int) -> None:
    """Raise a no-space OSError when `directory`'s filesystem has less than `need_bytes` free
    (local paths only; the loop turns it into the one line)."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return  # not a local filesystem (e.g. a FUSE mount without statvfs): let the write tell
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint needs ~{need_bytes} "
                      f"bytes, {free} free", str(d))


class _DropNoSpace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and is_no_space(exc))
                    or any(t in record.getMessage() for t in _NO_SPACE_TEXT))


@contextlib.contextmanager
def quiet_no_space():
    """While active, absl (Orbax) log records about a full disk are not printed: the run reports
    it once, as its `error:` line."""
    f = _DropNoSpace()
    logger = logging.getLogger("absl")
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
