"""Batched KV-cached generation (pipeline.speculative.generate) against independent oracles: the cached target
decoded one sequence at a time (pipeline.speculative.loop.ar_generate), HF torch `generate`, and the
sampling contract (a draw depends on seed and sequence index only, never on the batch)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.speculative import loop as sp
from pipeline.speculative.generate import BatchGenerator, SamplingConfig, pick
from pipeline.speculative.target import CachedTarget
from tests._spec_fixtures import make_target, random_prompts

NEW = 24


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("regen-target"))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(5, (3, 19), seed=11)


def _stop_token(target_dir, prompts):
    """A token the target emits mid-sequence: declared a stop id, rows must end there."""
    free = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=4,
                                        sampling=SamplingConfig(max_new_tokens=NEW))
    rows = free.generate(prompts, list(range(len(prompts))))
    counts = np.bincount(np.concatenate([r[2:NEW // 2] for r in rows]))
    return int(np.argmax(counts)), rows


def test_batched_greedy_equals_batch1_and_cached_target(target_dir, prompts):
    stop, free_rows = _stop_token(target_dir, prompts)
    sampling = SamplingConfig(max_new_tokens=NEW)
    batched = BatchGenerator.from_snapshot(target_dir, stop_ids=(stop,), batch_size=4,
                                           sampling=sampling).generate(prompts, list(range(5)))
    single = BatchGenerator.from_snapshot(target_dir, stop_ids=(stop,), batch_size=1,
                                          sampling=sampling).generate(prompts, list(range(5)))
    target = CachedTarget(target_dir, [0])
    oracle = [sp.ar_generate(target, p, max_new_tokens=NEW, stop_ids=(stop,)).tokens for p in prompts]
    assert batched == oracle
    assert single == oracle
    assert any(r[-1] == stop and len(r) < NEW for r in oracle)  # the stop path is exercised
    assert any(len(r) == NEW for r in free_rows)


def test_greedy_equals_hf_generate(target_dir, prompts):
    import torch
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(str(target_dir)).eval().float()
    # prefill in chunks of 8 columns (8 cached steps over the 64-column padded prompts; the
    # early chunks are all left padding for the short rows)
    gen = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=4, prefill_tokens=32,
                                       sampling=SamplingConfig(max_new_tokens=NEW))
    assert gen.prefill_chunk == 8
    ours = gen.generate(prompts, list(range(len(prompts))))
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, min_new_tokens=NEW)
        assert ref[0, len(p):].tolist() == o


def test_sampling_depends_on_seed_and_index_only(target_dir, prompts):
    s = SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=7)
    a = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=4, sampling=s)
    b = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=1, sampling=s)
    idx = [10, 11, 12, 13, 14]
    rows = a.generate(prompts, idx)
    # another batch size, and the prompts in reverse order (so other batch neighbours)
    assert b.generate(prompts, idx) == rows
    assert a.generate(prompts[::-1], idx[::-1]) == rows[::-1]
    other = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=4,
                                         sampling=SamplingConfig(max_new_tokens=NEW, temperature=1.0,
                                                                 top_p=0.9, seed=8))
    assert other.generate(prompts, idx) != rows
    greedy = BatchGenerator.from_snapshot(target_dir, stop_ids=(), batch_size=4,
                                          sampling=SamplingConfig(max_new_tokens=NEW))
    assert greedy.generate(prompts, idx) != rows  # T=1 sampling is not argmax


def test_pick_top_p_and_temperature():
    import jax
    import jax.numpy as jnp

    logits = jnp.asarray([0.0, 3.0, 1.0, 2.9, -1.0])
    key = jax.random.PRNGKey(0)
    # top_p below the top token's probability keeps that token alone
    assert int(pick(SamplingConfig(temperature=1.0, top_p=0.3), logits, key)) == 1
    assert int(pick(SamplingConfig(), logits, key)) == 1
    # top_p 0.9 keeps {1, 3, 2} (0.39, 0.36, 0.13 ... cumulative before each < 0.9); never 0 or 4
    draws = {int(pick(SamplingConfig(temperature=1.0, top_p=0.8), logits, k))
             for k in jax.random.split(key, 200)}
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum()
    order = np.argsort(-p)
    kept = {int(t) for t, before in zip(order, np.cumsum(p[order]) - p[order]) if before < 0.8}
    assert draws == kept


@pytest.mark.parametrize("n", [1, 4])  # 1: the decode path (sliding layers read their window)
def test_forward_rows_equals_forward_per_row(target_dir, n):
    """The batched forward against the single-sequence cached target, row by row: rows of
    different lengths left-padded to one write slot (past the sliding window), new tokens on top
    of a cache."""
    import jax
    import jax.numpy as jnp

    from pipeline.speculative import target as tc

    shape, params, _ = tc.load_target(target_dir, (0,))
    rng = np.random.default_rng(3)
    starts, size = [2, 9, 17], 32
    slot = max(starts)
    prefixes = [rng.integers(1, 200, s).astype(np.int32) for s in starts]
    new = rng.integers(1, 200, (len(starts), n)).astype(np.int32)
    rows_k, rows_v = tc.new_row_cache(shape, len(starts), size)
    # junk in every slot, so reading a padding slot or a stale one would show
    rows_k = tuple(k + 3.0 for k in rows_k)
    rows_v = tuple(v - 2.0 for v in rows_v)
    want = []
    for r, prefix in enumerate(prefixes):
        _, _, cache = tc.forward(shape, params, tc.new_cache(shape, size), jnp.asarray(prefix), jnp.int32(0))
        # the same keys/values, shifted to end at the shared slot (K [kv, hd, S], V [kv, S, hd])
        shift = slot - starts[r]
        rows_k = tuple(k.at[r, :, :, shift:slot].set(cache[0][i][0, :, :, :starts[r]])
                       for i, k in enumerate(rows_k))
        rows_v = tuple(v.at[r, :, shift:slot].set(cache[1][i][0, :, :starts[r]])
                       for i, v in enumerate(rows_v))
        hidden, _, _ = tc.forward(shape, params, cache, jnp.asarray(new[r]), jnp.int32(starts[r]))
        want.append(np.asarray(hidden))
    first = jnp.asarray([slot - s for s in starts], jnp.int32)
    run = jax.jit(lambda p, c, t, f: tc.forward_rows(shape, p, c, t, slot, f)[0])  # traced, as used
    got = run(params, (rows_k, rows_v), jnp.asarray(new), first)
    np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-5, atol=1e-5)
