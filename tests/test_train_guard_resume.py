"""Run-level guards (issue 11, item 4): a non-finite step stops the run keeping the last good
checkpoint; a resume on a cache of other content with the same shapes is refused; after a resume
metrics.jsonl holds one line per step."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import model
from pipeline.cache import open_cache
from pipeline.errors import UserError
from tests._train_fixtures import random_records, write_cache, write_teacher_stub
from train.config import TrainConfig
from train.guard import NonFiniteError
from train.loader import make_dataset
from train.loop import train

N_SEQS, SEQ_LEN, HIDDEN, VOCAB, LAYERS = 24, 32, 32, 128, (1, 2)


def _cache(tmp: Path, name: str, teacher: Path, seed: int, poison: int | None = None) -> Path:
    recs = random_records(N_SEQS, SEQ_LEN, len(LAYERS) * HIDDEN, VOCAB, seed=seed)
    if poison is not None:
        recs[poison][2][:] = np.nan  # every feature of one sequence
    write_cache(tmp / name, recs, hidden_size=HIDDEN, layer_ids=LAYERS,
                teacher={"path": str(teacher)}, mask_token_id=VOCAB - 1, vocab_size=VOCAB)
    return tmp / name


def _cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig.tiny(data=str(data), out=str(out), **kw)


def _metric_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher_stub(tmp_path_factory.mktemp("teacher"), hidden=HIDDEN, vocab=VOCAB)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher):
    """An 8-step run (checkpoints at 4 and 8) on cache A."""
    tmp = tmp_path_factory.mktemp("finished")
    data = _cache(tmp, "a", teacher, seed=0)
    out = tmp / "run"
    train(_cfg(data, out, steps=8, save_every=4))
    return tmp, data, out


def test_resume_metrics_one_line_per_step(finished, tmp_path):
    _, data, done = finished
    out = tmp_path / "run"
    shutil.copytree(done, out)
    first = _metric_rows(out)
    assert [r["step"] for r in first] == list(range(1, 9))
    shutil.rmtree(out / "checkpoints" / "8")  # as if killed after logging step 8, before its save
    train(_cfg(data, out, steps=8, save_every=4))  # resumes from 4, replays 5..8
    rows = _metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in first]  # the replay is exact


def test_truncate_metrics_drops_replayed_and_torn_lines(tmp_path):
    from train.metrics import truncate_metrics
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 7))
                 + '{"step": 7, "lo')
    truncate_metrics(p, 4)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_metrics(p, 0)
    assert p.read_text() == ""


def test_resume_on_other_cache_content_is_refused(finished, teacher):
    tmp, data, out = finished
    other = _cache(tmp, "b", teacher, seed=1)  # same shapes and teacher, other records
    a, b = open_cache(data).manifest, open_cache(other).manifest
    assert (a.seq_len, a.num_records, a.layer_ids) == (b.seq_len, b.num_records, b.layer_ids)
    run_json = (out / "run.json").read_text()
    with pytest.raises(UserError, match="holds other data than the cache"):
        train(_cfg(other, out, steps=8, save_every=4))
    assert (out / "run.json").read_text() == run_json


def _first_step_of(data: Path, index: int, cfg: TrainConfig) -> int:
    """1-based step whose batch first holds sequence `index` (the loader is the oracle)."""
    it = iter(make_dataset(open_cache(data), global_batch=cfg.batch_size,
                           anchors_per_seq=cfg.anchors_per_seq, seed=cfg.seed,
                           read_threads=1, prefetch=2))
    for step in range(1, 20):
        if index in set(np.asarray(next(it)["index"]).tolist()):
            return step
    raise AssertionError("sequence never drawn")


def test_nonfinite_step_stops_and_keeps_last_good_checkpoint(tmp_path, teacher):
    clean = _cache(tmp_path, "clean", teacher, seed=2)
    cfg = _cfg(clean, tmp_path / "x", steps=8, save_every=1)
    steps = {i: _first_step_of(clean, i, cfg) for i in range(N_SEQS)}
    poison = next(i for i, s in steps.items() if s == 3)  # first read by step 3
    data = _cache(tmp_path, "poisoned", teacher, seed=2, poison=poison)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite .*checkpoint \(step 2\) is kept"):
        train(_cfg(data, out, steps=8, save_every=1))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2]
    assert not (out / "export").exists()
    assert [r["step"] for r in _metric_rows(out)] == [1, 2]
    for leaf in jax.tree.leaves(model.load_msgpack(out / "draft_params.msgpack")[1]):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
