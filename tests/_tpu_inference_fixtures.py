"""The call into .venv-tpuinf, where tpu-inference 0.32.0 is installed
(tests/_tpu_inference_oracle.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TPUINF_PY = ROOT / ".venv-tpuinf" / "bin" / "python"


def run_tpu_inference(jobs: list[dict], workdir: Path) -> list[dict]:
    """Run the jobs with tests/_tpu_inference_oracle.py; -> each job's npz as a dict."""
    assert TPUINF_PY.exists(), "tpu-inference env missing: run `make tpuinf-venv`"
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([str(TPUINF_PY), str(ROOT / "tests" / "_tpu_inference_oracle.py"),
                          str(spec)], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return [dict(np.load(j["out"])) for j in jobs]
