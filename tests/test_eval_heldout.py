"""Held-out evaluation during training (issue 13 item 2): the split is pure and never trained
on (per process too), eval figures land in metrics.jsonl and the summary, equal a naive
decoder replay with the inference form, and a resume stays exact with the split active."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import model
from pipeline.cache import open_cache
from tests._train_fixtures import small_run_data
from train.config import TrainConfig
from train.heldout import TrainView, heldout_count, heldout_indices
from train.loader import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("evaldata"))


def test_split_is_pure_and_bounded():
    a = heldout_indices(1000, 0.02, 256, seed=3)
    assert len(a) == 20 and np.array_equal(a, heldout_indices(1000, 0.02, 256, seed=3))
    assert not np.array_equal(a, heldout_indices(1000, 0.02, 256, seed=4))
    assert np.all(np.diff(a) > 0) and a.max() < 1000
    assert heldout_count(24, 0.02, 256) == 1  # at least one
    assert heldout_count(10_000, 0.5, 7) == 7  # capped
    assert heldout_count(1, 0.5, 7) == 0  # never all of them
    assert heldout_count(100, 0.0, 7) == 0


def test_heldout_never_trained_on_any_process(data):
    cache = open_cache(data)
    held = heldout_indices(len(cache), 0.15, 256, seed=0)
    assert len(held) == 4
    rows = {cache[i]["input_ids"].tobytes(): i for i in range(len(cache))}
    seen = {0: [], 1: []}
    for p in (0, 1):
        it = iter(make_dataset(TrainView(cache, held), global_batch=8, anchors_per_seq=4,
                               seed=0, read_threads=1, prefetch=2, process_index=p,
                               process_count=2))
        for _ in range(6):  # 24 stream positions per process: the whole first epoch of 20
            b = next(it)
            seen[p] += [(int(e), rows[ids.tobytes()]) for e, ids in zip(b["epoch"], b["input_ids"])]
    first = [i for p in (0, 1) for e, i in seen[p] if e == 0]
    assert sorted(first) == sorted(set(range(len(cache))) - set(held.tolist()))
    assert not set(i for p in (0, 1) for _, i in seen[p]) & set(held.tolist())


def _naive_replay(export, teacher_embed, teacher_head, cache, held, block):
    """Decoder steps with the serving draft (pipeline.speculative.draft, KV-cached, one block at a
    time over the context of features < s), independent of the training form."""
    from pipeline.speculative.draft import CachedDraft

    draft = CachedDraft(export, teacher_embed, teacher_head)
    mask_id = draft.config.mask_token_id
    steps, correct, count = [], np.zeros(block - 1), np.zeros(block - 1)
    for i in held:
        rec = cache[int(i)]
        ids, mask = rec["input_ids"], rec["loss_mask"].astype(bool)
        feats = np.asarray(rec["features"], np.float32)
        t = len(ids)

        def argmax(s, v):
            draft.reset(64)
            if s:
                draft.extend(feats[:s])
            tokens = np.asarray([ids[s]] + [mask_id] * (v - 1), np.int32)
            return np.argmax(draft.logits(tokens, block), axis=-1)

        for s in range(t - 1):  # per-slot accuracy over the trainer's anchors
            if mask[s] and mask[s + 1]:
                pred = argmax(s, block)
                for k in range(1, block):
                    if s + k < t and mask[s + k]:
                        count[k - 1] += 1
                        correct[k - 1] += pred[k - 1] == ids[s + k]
        s, r1 = None, None
        for p in range(t + 1):  # runs of the loss mask, each one decode
            on = p < t and mask[p]
            if on and s is None:
                s = p
            if not on and s is not None:
                r1 = p
                while s + 1 < r1:
                    v = min(block, r1 - s)
                    pred = argmax(s, v)
                    a = 0
                    while a < v - 1 and pred[a] == ids[s + a + 1]:
                        a += 1
                    steps.append(min(a + 1, r1 - s - 1))
                    s += steps[-1]
                s = None
    return float(np.mean(steps)), correct / count, len(steps)


def test_train_logs_heldout_figures(data, tmp_path):
    from train.loop import train
    from train.teacher_weights import load_embedding_and_head

    out = tmp_path / "run"
    cfg = TrainConfig.tiny(data=str(data), out=str(out), steps=10, save_every=5,
                           eval_fraction=0.1, eval_every=5)
    summary = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_sim_tau" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all("loss" in r for r in rows if r["step"] == 10 and "eval_sim_tau" not in r)
    ev = summary["eval"]
    assert ev["sequences"] == 2 and ev["steps"] > 0 and ev["sim_tau"] >= 1.0
    assert {f"acc_slot{k}" for k in (1, 2, 3)} <= set(ev)
    # oracle: the naive decoder replay of the exported (float32) draft on the held-out sequences
    cache = open_cache(data)
    held = heldout_indices(len(cache), 0.1, 256, seed=0)
    embed, head = load_embedding_and_head(json.loads((data / "manifest.json").read_text())
                                          ["teacher"]["path"])
    tau, acc, n_steps = _naive_replay(out / "export", np.asarray(embed, np.float32),
                                      np.asarray(head, np.float32), cache, held, 4)
    assert ev["steps"] == n_steps
    assert ev["sim_tau"] == pytest.approx(tau, abs=1e-12)
    for k in (1, 2, 3):
        assert ev[f"acc_slot{k}"] == pytest.approx(acc[k - 1], abs=1e-12)


@pytest.mark.slow
def test_resume_exact_with_heldout(data, tmp_path):
    """Drop the last checkpoint (a kill before it committed), rerun: same params, same eval."""
    from train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig.tiny(data=str(data), out=str(out), steps=10, save_every=5,
                           eval_fraction=0.1, eval_every=5)
    first = train(cfg)
    params = (out / "draft_params.msgpack").read_bytes()
    shutil.rmtree(out / "checkpoints" / "10")
    second = train(cfg)
    assert (out / "draft_params.msgpack").read_bytes() == params
    assert second["eval"] == first["eval"]
