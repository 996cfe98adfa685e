"""Issue 22, item 2: a snapshot whose config.json does not describe its safetensors (hidden_size
1000000 beside the tiny teacher's 128-wide weights) is refused in one line before anything is
allocated, and a teacher too large for the host is refused by its memory estimate instead of
being loaded until the kernel kills the process."""
import json
import struct
import sys
from pathlib import Path

import pytest

from pipeline.teacher.snapshot_check import expected_tensors
from tests._reliability_fixtures import assert_hints_are_flags, one_line, run


@pytest.fixture(scope="module")
def tiny_teacher_dir():
    from pipeline.teacher.tiny import ensure_tiny_teacher
    return ensure_tiny_teacher()  # cached in /dev/shm: built once per machine


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_that_does_not_match_the_weights_is_one_line(tiny_teacher_dir, tmp_path):
    snap = _copy_with_config(Path(tiny_teacher_dir), tmp_path / "big", hidden_size=1_000_000)
    r = run([sys.executable, "-m", "pipeline.teacher_dump", "--model", str(snap), "--out",
             str(tmp_path / "cache"), "--seq-len", "128", "--max-seqs", "8", "--no-progress"],
            timeout=300)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "config.json does not describe the safetensors weights" in line
    assert "model.embed_tokens.weight is [4096, 128] F32, config.json implies [4096, 1000000]" in line
    assert not (tmp_path / "cache").exists()


def test_teacher_larger_than_the_host_is_refused_before_loading(tiny_teacher_dir, tmp_path):
    """A consistent config and headers that declare ~1.6 TB of float32 weights (the tensor bytes
    are absent: only the headers are read before the estimate refuses)."""
    snap = _copy_with_config(Path(tiny_teacher_dir), tmp_path / "huge", hidden_size=65536,
                             intermediate_size=65536, head_dim=16384)
    (snap / "model.safetensors").unlink()
    cfg = json.loads((snap / "config.json").read_text())
    header, at = {}, 0
    for name, shape in expected_tensors(cfg).items():
        shape = shape["dense"] if isinstance(shape, dict) else shape
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    blob = json.dumps(header).encode()
    (snap / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    out = tmp_path / "regen"
    r = run([sys.executable, "-m", "pipeline.regenerate", "--model", str(snap), "--out", str(out),
             "--max-prompts", "2", "--max-new-tokens", "4", "--no-progress"], timeout=600)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "GB of host memory" in line and "available" in line, line
    assert_hints_are_flags(line, "pipeline.regenerate")
    assert not out.exists() or not any(out.iterdir())
