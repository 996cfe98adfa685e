"""Host memory a process may still take: one definition for the trainer's memory pre-flight
(train/memory.py) and the teacher's (pipeline/teacher/snapshot_check.py)."""
from __future__ import annotations

import os
from pathlib import Path

GB = 1e9


def host_available_bytes(limit_gb: float | None = None) -> int:
    """Host RAM this run may still take: --memory-limit-gb when given; else MemAvailable, capped
    by the cgroup's limit (a container is killed at its own limit, not the machine's)."""
    if limit_gb is not None:
        return int(limit_gb * GB)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return int(avail)
