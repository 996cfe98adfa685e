"""The trainer's memory (issue 11, item 2): estimated before the first step, refused in one line
when it cannot fit, and the estimate holds against the child's measured peak resident set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_fixtures import small_run_data

ROOT = Path(__file__).resolve().parents[1]
# Runs a command as its only child and reports that child's peak resident set (KiB on Linux):
# a fresh wrapper, so no other child of the test process counts.
_WRAP = ("import json, resource, subprocess, sys; "
         "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "print(json.dumps({'rc': r.returncode, 'maxrss_kb': "
         "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
         "'stdout': r.stdout[-4000:], 'stderr': r.stderr[-4000:]}))")


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 128-token sequences: the default 512 anchors are capped at 127 per sequence
    return small_run_data(tmp_path_factory.mktemp("memory"), n_seqs=32, seq_len=128, hidden=64,
                          vocab=512)


def test_refuses_a_step_that_cannot_fit(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out),
           "--no-progress", "--steps", "2", "--draft-layers", "1", "--memory-limit-gb", "0.01"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = lines[0]
    for flag in ("--batch-size (now 16)", "--anchors-per-seq (now 512)", "--remat"):
        assert flag in line, line
    assert "10.0 MB available" in line and "of host memory" in line, line
    assert not out.exists(), "nothing written"


@pytest.mark.slow
def test_default_batch_peak_rss_within_estimate(data, tmp_path):
    """The CLI with its default batch (16 sequences x 127 anchors x block 8) on a tiny cache.

    The trainer predicts its peak as its resident set when it checks (interpreter, JAX and XLA
    runtime, the compiled step) plus what the step adds (8 CPU devices x the step's compiled
    memory, loader buffers, save copies); it logs both in memory.json. The measured peak must
    not exceed that prediction by more than 25% + 200 MB (allocator slack, thread stacks), and
    must reach at least half of what the estimate says the step adds: the estimate is neither
    blind to the step nor a wild over-count. 2 draft layers keep the compile short."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", _WRAP, sys.executable, "-m", "train.main", "--data", str(data),
           "--out", str(out), "--steps", "2", "--no-progress", "--draft-layers", "2"]
    r = json.loads(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=900).stdout)
    assert r["rc"] == 0, r["stderr"]
    est = json.loads((out / "memory.json").read_text())
    summary = json.loads(r["stdout"].strip().splitlines()[-1])
    assert summary["memory"] == est
    peak = r["maxrss_kb"] * 1024
    print(f"peak RSS {peak / 1e9:.3f} GB; at check {est['process_rss_bytes'] / 1e9:.3f} GB; "
          f"step adds {est['host_bytes'] / 1e9:.3f} GB; predicted "
          f"{est['predicted_peak_rss_bytes'] / 1e9:.3f} GB")
    assert est["host_bytes"] > 0.1e9  # the default batch is not negligible even here
    assert peak <= 1.25 * est["predicted_peak_rss_bytes"] + 200e6
    assert peak - est["process_rss_bytes"] >= 0.5 * est["host_bytes"]
