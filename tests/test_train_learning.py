"""Learning on the real thing: the embedded tiny GPT-OSS teacher's feature cache, dumped by
`pipeline.teacher_dump`, trains a 1-layer draft whose slot-1 top-1 accuracy rises far above its
value at initialisation within a couple hundred CPU steps (seed fixed)."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tools.make_tiny_teacher import ensure_tiny_teacher
from train.config import TrainConfig
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200


@pytest.mark.slow
def test_draft_learns_on_tiny_teacher_cache(tmp_path):
    ensure_tiny_teacher()
    cache = tmp_path / "cache"
    dump = [sys.executable, "-m", "pipeline.teacher_dump", "--model", "tiny", "--out", str(cache),
            "--seq-len", "128", "--max-seqs", "64", "--shards", "2", "--batch-size", "8",
            "--commit-every", "32", "--no-progress"]
    r = subprocess.run(dump, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "run"
    cfg = TrainConfig.tiny(data=str(cache), out=str(out), steps=STEPS, save_every=STEPS, lr=3e-3,
                           batch_size=8, block_size=4, draft_layers=1, anchors_per_seq=16,
                           vocab_chunk=1024, token_chunk=512, log_every=1, seed=0)
    summary = train(cfg, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc1 = np.array([r["acc_slot1"] for r in rows])
    start, end = acc1[:5].mean(), acc1[-20:].mean()
    print(f"slot-1 accuracy: first 5 steps {start:.3f}, last 20 steps {end:.3f}; "
          f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; tau {summary['expected_tau']:.3f}")
    # Measured (seed 0, 1 CPU device): 0.011 over the first 5 steps -> 0.164 over the last 20
    # (0.21 after 300 steps); loss 8.98 -> 5.72.
    assert start < 0.03
    assert end > start + 0.10
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0
    assert summary["expected_tau"] > 1.1
