"""JAX multi-controller start-up, shared by every command that runs on several hosts (the dump,
the trainer): the flags, declared once, and `process_group`, which initialises jax.distributed
from them before any device backend starts.

    python -m pipeline.teacher_dump ... --coordinator-address host0:1234 --num-processes 2 --process-id 0
    python -m train.main ... --distributed          # every host of a TPU pod, from its environment
"""
from __future__ import annotations

import argparse
import dataclasses

from pipeline.errors import UserError

BARRIER_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # hosts finish at different times; a lost peer fails it
FLAG_NAMES = ("coordinator_address", "num_processes", "process_id", "distributed")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The jax.distributed flags of every multi-host command."""
    parser.add_argument("--coordinator-address", default=None,
                        help="jax.distributed: host:port of process 0 (with --num-processes, "
                             "--process-id)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="jax.distributed: number of processes")
    parser.add_argument("--process-id", type=int, default=None,
                        help="jax.distributed: this process's index")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() from the cluster environment (TPU pod)")


def pop_flags(args: dict) -> argparse.Namespace:
    """Remove the distributed flags from parsed `vars(args)`; -> them as a namespace."""
    return argparse.Namespace(**{k: args.pop(k) for k in FLAG_NAMES})


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    index: int = 0
    count: int = 1
    client: object = None  # jax's DistributedRuntimeClient (key-value store and barriers)


def _global_state():
    from jax._src import distributed
    return distributed.global_state


def process_group(config) -> ProcessGroup:
    """Initialise jax.distributed from the flags (or the pod environment with --distributed) when
    asked; -> this process's index and the count. Never starts a device backend."""
    flags = (config.coordinator_address, config.num_processes, config.process_id)
    state = _global_state() if (config.distributed or any(f is not None for f in flags)) else None
    if state is not None and state.client is None:
        import jax
        if not config.distributed and None in flags:
            raise UserError("--coordinator-address, --num-processes and --process-id go together "
                            "(or pass --distributed on a TPU pod)")
        try:
            jax.distributed.initialize(*flags) if not config.distributed else \
                jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), repr(e))
            raise UserError(f"jax.distributed.initialize failed: {first}") from None
    if state is None:
        try:
            state = _global_state()
        except ImportError:
            return ProcessGroup()
    if state.client is None:
        return ProcessGroup()
    return ProcessGroup(int(state.process_id), int(state.num_processes), state.client)
