"""Simulated tau: the acceptance lengths greedy speculative decoding would see on a sequence,
computed offline from training-form draft forwards.

On target-regenerated greedy data a sequence IS what the target decodes, so the decoder's steps
can be replayed without the target. The conventions are `pipeline.speculative.loop`'s, step for step:

- A generated region ("run") is a maximal run [r0, r1) of loss_mask == 1 positions. Serving
  would prefill x[:r0] (its prefill emits x[r0], the first generated token) and stop at
  max_length = r1 (max_new_tokens, or the position after an EOS); tokens outside the runs are
  teacher-forced, never anchors.
- Step at anchor s (the first s is r0, the token x[s] is the block's slot 0): the draft sees the
  features of positions < s and the block [x[s], MASK x (v-1)] with v = min(B, r1 - s) (the
  harness verifies a shorter tail block near the end; its masked rows past v do not exist, so
  tail blocks are forwarded at their own length v). a = the number of leading slots k = 1..v-1
  whose argmax equals x[s+k]; produced = min(a + 1, r1 - s - 1) (the bonus token, cut at the
  end); the next anchor is s + produced. Steps run while s + 1 < r1.
- tau = mean of `produced` over every step of every run (pooled, as the harness reports it).

Full blocks come from ONE training-form forward with an anchor at every position
(`model.draft_hidden_train`, block-sparse: block s sees context < s, which is exactly the
decoder's context); tail blocks (s > r1 - B) from one forward per tail length v = 2..B-1 with
one anchor per run. Draft logits are reduced to argmax (and the labels' NLL) in anchor chunks,
so the [anchors x slots x vocab] logits never exist at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import model
from model.dflash2 import predecessor_ids

LOGIT_BYTES = 1 << 28  # float32 logits per head chunk (anchors x slots x vocab)


def generated_runs(loss_mask) -> list[tuple[int, int]]:
    """Maximal runs [r0, r1) of loss_mask == 1 (each one decode)."""
    m = np.asarray(loss_mask).astype(np.int8).ravel()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def tail_anchors(runs, block: int, count: int) -> np.ndarray:
    """[B-2, count] int32: row v-2 holds, per run, the anchor r1 - v whose block is v long
    (0 where the run is too short to reach it, or past the real runs; never read then)."""
    out = np.zeros((max(block - 2, 0), count), np.int32)
    for j, (r0, r1) in enumerate(runs):
        for v in range(2, block):
            if r1 - v >= r0:
                out[v - 2, j] = r1 - v
    return out


def walk(correct_full: np.ndarray, tail_correct: dict, runs, block: int) -> list[int]:
    """`produced` of every decoder step over `runs` of one sequence.

    correct_full [T, B-1]: slot k of the full block at anchor s predicts x[s+k];
    tail_correct {v: [runs, v-1]}: the same for the tail block of length v of each run."""
    steps = []
    for j, (r0, r1) in enumerate(runs):
        s = r0
        while s + 1 < r1:
            v = min(block, r1 - s)
            row = correct_full[s, : v - 1] if v == block else tail_correct[v][j]
            a = int(np.cumprod(row).sum())
            produced = min(a + 1, r1 - s - 1)
            steps.append(produced)
            s += produced
    return steps


def _labels(input_ids, anchors, width):
    """input_ids[anchor + k] for k = 1..width ([b, N, width]; clipped past the end)."""
    t = input_ids.shape[1]
    pos = jnp.minimum(anchors[..., None] + jnp.arange(1, width + 1), t - 1)
    flat = pos.reshape(pos.shape[0], -1)
    return jnp.take_along_axis(input_ids, flat, axis=1).reshape(pos.shape)


def block_predictions(config, params, embed, lm_head, input_ids, features, anchors, width: int,
                      *, chunk_blocks: int | None = None):
    """Blocks of `width` tokens [x[a], MASK...] at anchors [b, N] -> (the token each slot
    1..width-1 proposes [b, N, width-1] int32: the argmax, or for DFlash2 the selector's pick
    with teacher-forced predecessors; NLL of their labels x[a+k] [b, N, width-1] float32, of the
    unary logits). Pure (jit it)."""
    tokens = model.block_tokens(config, input_ids, anchors)[..., :width]
    emb = model.embed_block(config, embed, tokens).astype(features.dtype)
    hidden = model.draft_hidden_train(config, params, features, emb, anchors,
                                      chunk_blocks=chunk_blocks)[:, :, 1:]
    labels = _labels(input_ids, anchors, width - 1)
    b, n, w, h = hidden.shape
    per_anchor = b * w * lm_head.shape[0] * 4
    c = int(max(1, min(n, LOGIT_BYTES // max(per_anchor, 1))))
    groups = -(-n // c)
    pad = groups * c - n

    def grouped(x):  # [b, N, ...] -> [G, b, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, groups, c, *x.shape[2:]), 1, 0)

    # DFlash2: slot k's token is the selector's pick among the unary top-K after x[a+k-1]: while
    # the path is accepted its predecessors ARE the labels, so teacher forcing replays it exactly
    prev = predecessor_ids(input_ids, anchors, w)

    def head(args):
        hid, lab, pre = args
        logits = model.draft_logits(config, hid, lm_head.astype(hid.dtype)).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
        if config.dflash2 is None:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), lse - picked
        unary, cands = jax.lax.top_k(logits, config.dflash2.selector_top_k)
        scores = model.DFlashDraft(config).apply(model.as_variables(params), unary, hid, pre,
                                                 cands, method="selector_scores")
        best = jnp.argmax(scores, axis=-1)[..., None]
        return jnp.take_along_axis(cands, best, axis=-1)[..., 0].astype(jnp.int32), lse - picked

    pred, nll = jax.lax.map(head, (grouped(hidden), grouped(labels), grouped(prev)))
    unflat = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, groups * c, w)[:, :n]  # noqa: E731
    return unflat(pred), unflat(nll)


def sequence_predictions(config, params, embed, lm_head, input_ids, features, tails):
    """Every full block (an anchor at each of the T positions) and the tail blocks of `tails`
    [b, B-2, R] -> (pred [b, T, B-1], nll [b, T, B-1], (tail pred [b, R, v-1] for v = 2..B-1)).
    Pure (jit it)."""
    b, t = input_ids.shape
    block = config.block_size
    anchors = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pred, nll = block_predictions(config, params, embed, lm_head, input_ids, features, anchors,
                                  block)
    tail = tuple(block_predictions(config, params, embed, lm_head, input_ids, features,
                                   tails[:, v - 2], v)[0] for v in range(2, block))
    return pred, nll, tail


def correct_full(input_ids: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[T, B-1] bool: pred[s, k-1] == x[s+k] (False where s + k >= T)."""
    t, w = pred.shape
    pos = np.arange(t)[:, None] + np.arange(1, w + 1)
    ids = np.asarray(input_ids)
    return (pos < t) & (pred == ids[np.minimum(pos, t - 1)])


def correct_tails(input_ids: np.ndarray, tails: np.ndarray, tail_pred) -> dict:
    """{v: [R, v-1] bool} for the tail anchors tails [B-2, R] and predictions (per v)."""
    ids, t = np.asarray(input_ids), len(input_ids)
    out = {}
    for v, pred in zip(range(2, len(tail_pred) + 2), tail_pred):
        pos = np.asarray(tails[v - 2])[:, None] + np.arange(1, v)
        out[v] = (pos < t) & (np.asarray(pred) == ids[np.minimum(pos, t - 1)])
    return out


@functools.partial(jax.jit, static_argnums=0)
def _predict_jit(config, params, embed, lm_head, input_ids, features, tails):
    return sequence_predictions(config, params, embed, lm_head, input_ids, features, tails)


def simulate_sequence(config, params, embed, lm_head, input_ids, loss_mask, features,
                      pad_to: int | None = None) -> list[int]:
    """`produced` of every step the decoder would take on one sequence (host arrays: ids [T],
    mask [T], features [T, F]). pad_to: pad T (zeros after the end change nothing: a block only
    sees positions before its anchor and itself) so that many lengths share one compile."""
    ids = np.asarray(input_ids, np.int32)
    t = len(ids)
    pad = max(pad_to or t, t) - t
    runs = generated_runs(loss_mask)
    tails = tail_anchors(runs, config.block_size, max(1, len(runs)))
    f = np.asarray(features)
    pred, _, tail_pred = _predict_jit(
        config, params, embed, lm_head, jnp.asarray(np.pad(ids, (0, pad)))[None],
        jnp.asarray(np.pad(f, ((0, pad), (0, 0))))[None], jnp.asarray(tails)[None])
    full = correct_full(ids, np.asarray(pred)[0, :t])
    tail = correct_tails(ids, tails, [np.asarray(p)[0] for p in tail_pred])
    return walk(full, tail, runs, config.block_size)
