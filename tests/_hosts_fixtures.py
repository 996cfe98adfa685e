"""Helpers of the multi-process (jax.distributed on localhost) and TensorStore tests.

`start_processes` launches P copies of `python -m tests._hosts_fixtures <mode> ...`, each one
JAX process of a localhost cluster (CPU backend, gloo collectives): mode `dump` runs the dump CLI
with the cheap stand-in teacher on its slice of the data, mode `train` runs the trainer
(tests/_hosts_train.py).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(mode: str, args: list[str], count: int = 2, kill: dict | None = None,
                    devices: int = 2, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """P processes of one jax.distributed cluster; `kill` maps process id -> DFLASH_DUMP_KILL."""
    port = free_port()
    procs = []
    for pid in range(count):
        env = dict(os.environ)
        env.pop("DFLASH_DUMP_KILL", None)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
        env.update(extra_env or {})
        if kill and pid in kill:
            env["DFLASH_DUMP_KILL"] = kill[pid]
        cmd = [sys.executable, "-m", "tests._hosts_fixtures", mode, *args,
               "--coordinator-address", f"localhost:{port}", "--num-processes", str(count),
               "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs, timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


def _dump(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fake-n", type=int, required=True)
    p.add_argument("--fake-hidden", type=int, default=16)
    p.add_argument("--teacher-path", default=None, help="snapshot the stand-in claims to be")
    p.add_argument("--fake-vocab", type=int, default=None, help="token ids below this")
    a, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]
    from pipeline import teacher_dump
    from pipeline.distributed import process_group
    from tests._dump_fixtures import FakeTeacher

    config = teacher_dump.parse_args(rest + ["--no-progress"])
    process_group(config)  # jax.distributed first: the stand-in teacher touches the backend
    teacher = FakeTeacher(a.fake_hidden)
    if a.teacher_path:
        teacher.path = a.teacher_path
    return teacher_dump.main(rest + ["--no-progress"], teacher=teacher,
                             sequences=vocab_sequences(a.fake_n, config.seq_len, a.fake_vocab))


def vocab_sequences(n: int, seq_len: int, vocab: int | None = None):
    """`fake_sequences` with token ids folded below `vocab` (a small teacher's vocabulary)."""
    from tests._dump_fixtures import fake_sequences
    for ids, mask in fake_sequences(n, seq_len):
        yield (ids if vocab is None else ids % vocab), mask


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "dump":
        return _dump(argv)
    if mode == "train":
        from tests._hosts_train import main as train_main
        return train_main(argv)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
