"""Preemption: SIGTERM (what a preemptible or maintenance-bound TPU VM, Kubernetes or Slurm send
before they kill a job) asks a long job to stop cleanly instead of dying at once.

`StopOnSignal()` installs a SIGTERM handler that only sets a flag. The trainer asks
`should_stop(...)` after each step and, when it is set, saves a checkpoint after that step; the
dump stops queuing batches, lets the writer commit what it holds and drops the uncommitted
interval; regenerate stops after the part it is writing. Each then raises `Preempted`. The CLIs
print one `preempted:` line and exit with `PREEMPTED_EXIT` (75, EX_TEMPFAIL:
"temporary failure, retry"), distinct from success (0), bad input (2), Ctrl-C (130) and a kill
(137/143), so a scheduler can tell "stopped cleanly, rerun to resume" from a crash. A second
SIGTERM takes the default action (the process ends at once), so a stuck save can still be killed.

With several processes every one must stop after the same step (they save collectively), so the
flag is combined across processes at the steps the loop syncs anyway (log points).
"""
from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run stopped on SIGTERM after saving; the message says where and how to resume."""


class StopOnSignal:
    """Context manager: while active, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested: int | None = None  # the signal number received
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one kills at once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        return False

    def should_stop(self, sync: bool) -> bool:
        """True when a stop was requested (here, or with `sync` on any process)."""
        import jax

        mine = self.requested is not None
        if jax.process_count() == 1 or not sync:
            return mine and jax.process_count() == 1
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([mine], np.int32))
        return bool(np.asarray(flags).any())
