"""Drop the known-spurious lines from a CLI's stderr; pass every other byte on as it comes.

  - XLA:CPU logs two E-level lines ("Target machine feature +prefer-no-gather is not supported on
    the host machine ... could lead to execution errors such as SIGILL") each time it loads a
    program from the persistent compilation cache, even one this machine just compiled: it counts
    LLVM tuning flags as CPU features (jax-ml/jax#38445, openxla/xla#44565; jax 0.9.2). The cached
    program loads and runs (a cache hit, measured).
  - Grain warns at import that multiprocess worker profiling needs jaxlib >= 0.11 (we never
    profile Grain workers).

`install()` (first line of every CLI's `__main__`) points fd 2 at a pipe read by a small child
process that writes the other lines to the real stderr. The lines come from C++ (absl logging
to fd 2) as well as Python, so only a file-descriptor filter sees both. A child, not a thread:
when the CLI crashes (a C++ abort, a signal) the child still drains what was written before, so
the last words of a crash are never lost. `is_benign` is what tools/demo.py filters its steps'
stderr with, the same rule. DFLASH_RAW_STDERR=1 turns the filter off.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys

BENIGN = (("cpu_aot_loader.cc", "+prefer-no-"),  # every marker of one entry is in the line
          ("Grain multiprocess worker profiling requires jaxlib",))


def is_benign(line: str) -> bool:
    return any(all(mark in line for mark in marks) for marks in BENIGN)


def install() -> None:
    """Filter this process's stderr (fd 2) from here on; no-op when it is off or impossible."""
    if os.environ.get("DFLASH_RAW_STDERR") == "1" or os.environ.get("_DFLASH_STDERR_FILTERED"):
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        child = subprocess.Popen([sys.executable, "-m", "pipeline.stderr_filter"],
                                 stdin=subprocess.PIPE, stdout=saved, stderr=saved,
                                 env={**os.environ, "_DFLASH_STDERR_FILTERED": "1"})
    except OSError:
        return
    os.dup2(child.stdin.fileno(), 2)
    os.environ["_DFLASH_STDERR_FILTERED"] = "1"  # child CLIs write through this filter already

    def restore() -> None:  # at exit: the child gets EOF, writes what is left, and ends
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    atexit.register(restore)


def _relay() -> None:
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:  # line by line; a partial last line comes at EOF
        if not is_benign(raw.decode("utf-8", "replace")):
            out.write(raw)
            out.flush()


if __name__ == "__main__":
    _relay()
