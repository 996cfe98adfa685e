"""The real dump command, `python -m pipeline.teacher_dump --model tiny`, end to end: SIGKILLed
mid-write and mid-commit then rerun, it ends with the same cache as an uninterrupted run; the
records hold the data loader's sequences; a rerun of a finished cache does nothing."""
import json
import os
import subprocess
import sys

import pytest

from model import build_target_layer_ids
from pipeline.cache import KILL_ENV, Ledger, open_cache
from tests._dump_fixtures import REPO, assert_same_cache

N = 20
ARGS = ["--model", "tiny", "--shards", "3", "--seq-len", "64", "--batch-size", "4",
        "--commit-every", "8", "--max-seqs", str(N)]


def _cli(out, kill=None, timeout=400):
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "pipeline.teacher_dump", *ARGS, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny():
    from tools.make_tiny_teacher import ensure_tiny_teacher
    return ensure_tiny_teacher()


@pytest.mark.slow
def test_tiny_cli_kill_resume_matches_uninterrupted_run(tmp_path, tiny):
    ref = tmp_path / "ref"
    proc = _cli(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sequences"] == N and summary["tokens"] == N * 64
    assert summary["bytes"] > 0 and summary["tokens_per_s"] > 0
    assert "dump:" in proc.stderr  # the progress bar

    cache = open_cache(ref, verify=True)
    m = cache.manifest
    hf = json.loads((tiny / "config.json").read_text())
    assert m.layer_ids == tuple(build_target_layer_ids(hf["num_hidden_layers"], 5))
    assert m.hidden_size == hf["hidden_size"] and m.feature_dim == 5 * hf["hidden_size"]
    assert m.mask_token_id == hf["mask_token_id"] and m.teacher["path"] == str(tiny.resolve())
    assert m.settings["attention"] == "vanilla"  # --attention auto on CPU
    # The records are the data loader's sequences, in order (independent re-tokenization).
    from transformers import AutoTokenizer

    from pipeline.data.sequences import iter_sequences
    seqs = iter_sequences(None, AutoTokenizer.from_pretrained(str(tiny)), 64)
    for i, (ids, mask) in zip(range(N), seqs):
        assert (cache[i]["input_ids"] == ids).all() and (cache[i]["loss_mask"] == mask).all()
        feats = cache[i]["features"].astype("float32")
        assert abs(feats).max() > 0 and (feats == feats).all()  # real, finite activations

    out = tmp_path / "run"
    for kill, committed in [("after_record:5", 0), ("before_ledger:16", 8)]:
        proc = _cli(out, kill)
        assert proc.returncode == -9, (kill, proc.stderr[-3000:])
        assert Ledger.load(out).committed == committed
    proc = _cli(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["sequences"] == N - 8
    assert_same_cache(ref, out)

    proc = _cli(out)
    assert proc.returncode == 0 and f"already complete ({N} sequences)" in proc.stderr
