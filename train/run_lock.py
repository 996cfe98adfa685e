"""One trainer per run directory: `run_lock(out)` holds an exclusive flock on --out for the whole
run, as the dump does on its cache (pipeline/cache/prepare.py `lock_cache`). Two trainers on one
--out would both write Orbax checkpoints and metrics.jsonl into it; the second is refused in one
line before it compiles or writes anything.

The lock is taken on the directory itself (no lock file inside it), by process 0 only: on a pod
every process names the same --out, which may be one shared filesystem. A directory this call
had to create is removed again if the run fails while it is still empty (nothing written).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import jax

from pipeline.errors import UserError


@contextlib.contextmanager
def run_lock(out):
    out = Path(out)
    if jax.process_index() != 0:
        yield
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the run directory ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another trainer is running in --out {out} (it holds the run's "
                            "lock); wait for it to finish or stop it, or use another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds while empty: a run that wrote nothing leaves nothing
