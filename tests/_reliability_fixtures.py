"""Helpers of the issue-22 reliability tests: the trainer run as a user runs it (a subprocess),
its one-line outputs, TensorBoard events read back, exports compared, a small real filesystem."""
from __future__ import annotations

import contextlib
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--no-progress", "--draft-layers", "1", "--log-every", "1", "--compute-dtype",
               "float32", "--block-size", "4", "--batch-size", "8", "--anchors-per-seq", "4",
               "--eval-fraction", "0"]


def train_cmd(data, out, steps: int, *extra) -> list[str]:
    return [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out),
            "--steps", str(steps), *TRAIN_FLAGS, *map(str, extra)]


def run(cmd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str, prefix: str = "error:") -> str:
    """The single `prefix` line of stderr (asserts there is exactly one and no traceback)."""
    lines = [x for x in stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def help_flags(module: str) -> set[str]:
    r = run([sys.executable, "-m", module, "--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(re.findall(r"--[a-z][a-z0-9-]+", r.stdout))


def assert_hints_are_flags(line: str, module: str) -> None:
    """Every --flag an error line names is a flag of the command that printed it (issue 22, 7)."""
    # a flag written after another command's name ("pipeline.teacher_dump --overwrite") is that
    # command's, and says so
    own = re.sub(r"(pipeline|tools|train)\.[\w.]+(\s+--[a-z][a-z0-9-]+)+", "", line)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", own))
    unknown = named - help_flags(module)
    assert not unknown, f"{module} has no {sorted(unknown)}: {line}"
    assert "=True" not in line and "=False" not in line, line  # Python arguments are no hints


def wait_for_lines(path: Path, n: int, proc, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} lines")


def tb_scalars(tb_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in every event file under tb_dir (TFRecord framing, parsed
    with tensorboardX's Event proto)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            ev = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            out += [(v.tag, int(ev.step)) for v in ev.summary.value]
    return out


def export_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / "export" / "model.safetensors"))


def assert_same_export(a: Path, b: Path) -> None:
    ta, tb = export_tensors(a), export_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@contextlib.contextmanager
def small_tmpfs(size: str):
    """A real filesystem of `size` (tmpfs; needs root and mount), or None where the machine does
    not allow it (the caller skips, saying so)."""
    mnt = Path(tempfile.mkdtemp(prefix="dflash-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        mnt.rmdir()
