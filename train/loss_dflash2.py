"""DFlash2 loss: the DFlash loss plus alpha x the candidate selector's K-way cross-entropy.

Per supervised slot (anchor + k, k >= 1): the candidates are the unary top-K of the draft's
logits (found chunk by chunk over the vocabulary, so the [tokens x vocab] logits never exist,
and without gradient: the choice is discrete); where the label is not among them it replaces
the weakest one (rank K-1), so every slot has a K-way label (speculators 0.9.0
`selector_training_candidates`). The selector scores them with the teacher-forced predecessor
input_ids[anchor + k - 1] (the anchor for slot 1): scores = unary logit + bilinear transition
(`model.DFlashDraft.selector_scores`); gradients reach the hidden states through both terms and
the selector's params through the second. The selector CE is weighted by the same decay
weights and normalised the same way as the DFlash CE (by the sum of the weights applied; see
train/loss.py and tests/test_dflash2_loss.py for speculators' normalisation).

Metrics (sums; the logger divides): candidate recall (label in the unary top-K) over supervised
slots, teacher-forced selector accuracy over the slots whose label was a real candidate (what
serving can pick), and per slot the selector's pick being right with a real candidate: the
per-slot accuracy of the path serving walks (its expected tau).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import model
from model.dflash2 import predecessor_ids
from train.loss import _chunk_logits, _merge, _split, _vocab_chunks, dflash_loss

SELECTOR_TOKEN_CHUNK = 512  # tokens per step of the candidate scoring (bounds the [m, K, H] gather)


def _topk_tokens(h, w, k, chunk):
    """One token chunk h [b, m, H]: the top-k logits' ids [b, m, k] by a scan over vocab chunks
    (descending; ties keep the lower id, as lax.top_k over the whole row)."""
    chunk, n = _vocab_chunks(w.shape[0], chunk)
    kk = min(k, chunk)

    def body(carry, i):
        vals, ids = carry
        logits, cols, _ = _chunk_logits(h, w, i, chunk)
        c_vals, c_idx = lax.top_k(logits, kk)
        both_v = jnp.concatenate([vals, c_vals], axis=-1)
        both_i = jnp.concatenate([ids, cols[c_idx]], axis=-1)
        top_v, pick = lax.top_k(both_v, k)
        return (top_v, jnp.take_along_axis(both_i, pick, axis=-1)), None

    shape = h.shape[:-1] + (k,)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.int32))
    (_, ids), _ = lax.scan(body, init, jnp.arange(n))
    return ids


def chunked_topk(h, w, k: int, vocab_chunk: int, token_chunk: int):
    """ids [b, L, k] of the k largest logits of h [b, L, H] @ w[V, H].T, never building the
    logits; no gradient."""
    h = lax.stop_gradient(h)
    hc, length = _split(h, token_chunk)
    ids = lax.map(lambda a: _topk_tokens(a, w, k, vocab_chunk), hc)
    return _merge(ids, length)


def training_candidates(candidates, labels):
    """Inject a missing label at rank K-1: (candidates [.., K], label index [..], label was a
    real candidate [..])."""
    top_k = candidates.shape[-1]
    match = candidates == labels[..., None]
    contains = match.any(axis=-1)
    position = jnp.where(contains, jnp.argmax(match, axis=-1), top_k - 1)
    last = jnp.where(contains, candidates[..., -1], labels)
    return candidates.at[..., -1].set(last), position, contains


def candidate_scores(dcfg, params, h, lm_head, predecessors, candidates):
    """Selector logits [b, L, K] of candidates [b, L, K] after predecessors [b, L] for hidden
    h [b, L, H]; walked in token chunks, each recomputed in the backward pass (remat), so the
    gathered head rows [chunk, K, H] exist for one chunk at a time."""
    variables = model.as_variables(params)
    selector = model.DFlashDraft(dcfg)

    @jax.checkpoint
    def chunk(args):
        hc, pc, cc = args
        rows = jnp.take(lm_head, cc, axis=0).astype(hc.dtype)  # [b, m, K, H]
        unary = jnp.einsum("bmh,bmkh->bmk", hc, rows, preferred_element_type=jnp.float32)
        return selector.apply(variables, unary, hc, pc, cc, method="selector_scores")

    hc, length = _split(h, SELECTOR_TOKEN_CHUNK)
    pc, _ = _split(predecessors, SELECTOR_TOKEN_CHUNK)
    cc, _ = _split(candidates, SELECTOR_TOKEN_CHUNK)
    return _merge(lax.map(chunk, (hc, pc, cc)), length).astype(jnp.float32)


def dflash2_loss(dcfg, params, hidden, lm_head, input_ids, anchors, labels, supervised, weights,
                 *, alpha: float, vocab_chunk: int, token_chunk: int):
    """DFlash loss + alpha x selector CE. hidden [b, N, B, H], input_ids [b, T], anchors [b, N],
    labels / supervised [b, N, B] (train.anchors.block_labels), weights [B] (w[0] = 0)
    -> (loss, aux): dflash_loss's aux plus unary_loss, selector_loss, cand_hit (label among
    the unary top-K), selector_correct (teacher-forced pick right, label a real candidate) and
    its per-slot sums sel_slot_correct [B-1]."""
    unary_loss, aux = dflash_loss(hidden, lm_head, labels, supervised, weights,
                                  vocab_chunk=vocab_chunk, token_chunk=token_chunk)
    b, n, bs, hd = hidden.shape
    h = hidden[:, :, 1:].reshape(b, n * (bs - 1), hd)
    lab = labels[:, :, 1:].reshape(b, -1)
    sup = supervised[:, :, 1:]
    prev = predecessor_ids(input_ids, anchors, bs - 1).reshape(b, -1)
    top = chunked_topk(h, lm_head, dcfg.dflash2.selector_top_k, vocab_chunk, token_chunk)
    cands, position, contains = training_candidates(top, lab)
    scores = candidate_scores(dcfg, params, h, lm_head, prev, cands)
    lse = jax.nn.logsumexp(scores, axis=-1)
    ce = lse - jnp.take_along_axis(scores, position[..., None], axis=-1)[..., 0]
    w_tok = (jnp.asarray(weights, jnp.float32)[1:] * sup).reshape(b, -1)
    selector_loss = (w_tok * ce).sum() / jnp.maximum(w_tok.sum(), 1e-9)
    contains = contains.reshape(sup.shape) & sup
    right = (jnp.argmax(scores, axis=-1) == position).reshape(sup.shape) & contains
    aux = dict(aux, unary_loss=unary_loss, selector_loss=selector_loss,
               cand_hit=contains.sum(), selector_correct=right.sum(),
               sel_slot_correct=right.sum(axis=(0, 1)))
    return unary_loss + alpha * selector_loss, aux
