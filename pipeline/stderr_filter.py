"""Drop the known-spurious lines from a CLI's stderr; pass every other byte on as it comes.

  - XLA:CPU logs two E-level lines ("Target machine feature +prefer-no-gather is not supported on
    the host machine ... could lead to execution errors such as SIGILL") each time it loads a
    program from the persistent compilation cache, even one this machine just compiled: it counts
    LLVM tuning flags as CPU features (jax-ml/jax#38445, openxla/xla#44565; jax 0.9.2). The cached
    program loads and runs (a cache hit, measured).
  - Grain warns at import that multiprocess worker profiling needs jaxlib >= 0.11 (we never
    profile Grain workers).

`install()` (first line of every CLI's `__main__`) points fd 2 at a pipe read by a small child
process (stdlib only, ignoring SIGINT/SIGTERM/SIGHUP sent to the process group) that writes the
other lines to the real stderr. The lines come from C++ (absl logging
to fd 2) as well as Python, so only a file-descriptor filter sees both. A child, not a thread:
when the CLI crashes (a C++ abort, a signal) the child still drains what was written before, so
the last words of a crash are never lost. `is_benign` is what tools/demo.py filters its steps'
stderr with, the same rule. DFLASH_RAW_STDERR=1 turns the filter off.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys

BENIGN = (("cpu_aot_loader.cc", "+prefer-no-"),  # every marker of one entry is in the line
          ("Grain multiprocess worker profiling requires jaxlib",))


def is_benign(line: str) -> bool:
    return any(all(mark in line for mark in marks) for marks in BENIGN)


# The child: plain stdlib, no project import (it must start wherever the CLI runs), deaf to the
# signals a terminal or a scheduler sends the whole process group (Ctrl-C, SIGTERM): it ends
# when the CLI's end closes the pipe, after relaying everything written before.
_CHILD = """
import json, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
benign = json.loads(sys.argv[1])
out = sys.stdout.buffer
for raw in sys.stdin.buffer:
    line = raw.decode("utf-8", "replace")
    if not any(all(m in line for m in marks) for marks in benign):
        out.write(raw)
        out.flush()
"""


def install() -> None:
    """Filter this process's stderr (fd 2) from here on; no-op when it is off or impossible."""
    if os.environ.get("DFLASH_RAW_STDERR") == "1" or os.environ.get("_DFLASH_STDERR_FILTERED"):
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        child = subprocess.Popen([sys.executable, "-S", "-c", _CHILD, json.dumps(BENIGN)],
                                 stdin=subprocess.PIPE, stdout=saved, stderr=saved,
                                 start_new_session=True)  # out of reach of a group's signals
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
