"""DFlash loss: decay-weighted CE through the frozen LM head, chunked so that the
[block tokens x vocab] logits (3.6K tokens x 201,088 vocab per sequence for gpt-oss) never exist
at once, in the forward or the backward.

`chunked_nll` walks token chunks (lax.map) and, inside, vocab chunks (lax.scan) with an online
logsumexp. Its custom VJP recomputes each chunk's logits from the saved logsumexp, so the backward
is chunked the same way and stores only O(tokens) residuals. It also returns the argmax (top-1
accuracy comes for free from the same pass).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def decay_weights(block_size: int, gamma: float) -> np.ndarray:
    """w[0] = 0 (the anchor slot carries no loss); w[k] = exp(-(k-1)/gamma) for k >= 1."""
    k = np.arange(block_size, dtype=np.float64)
    w = np.exp(-(k - 1.0) / gamma)
    w[0] = 0.0
    return w.astype(np.float32)


def _vocab_chunks(vocab: int, chunk: int) -> tuple[int, int]:
    chunk = min(chunk, vocab)
    return chunk, -(-vocab // chunk)


def _chunk_logits(h, w, i, chunk):
    """Logits of vocab chunk i, f32 [b, m, chunk]; the last chunk is shifted back to end at V (no
    padded copy of the head) and its columns already seen are masked to -inf."""
    vocab = w.shape[0]
    start = jnp.minimum(i * chunk, vocab - chunk)
    w_c = lax.dynamic_slice_in_dim(w, start, chunk, axis=0)
    logits = jnp.einsum("bmh,vh->bmv", h, w_c, preferred_element_type=jnp.float32)
    cols = start + jnp.arange(chunk)
    fresh = cols >= i * chunk
    return jnp.where(fresh, logits, -jnp.inf), cols, fresh


def _forward_tokens(h, w, labels, chunk):
    """One token chunk h [b, m, H]: (logsumexp, label logit, argmax) [b, m] by a scan over
    vocab chunks."""
    chunk, n = _vocab_chunks(w.shape[0], chunk)
    shape = h.shape[:-1]

    def body(carry, i):
        run_max, run_sum, lab, best, arg = carry
        logits, cols, _ = _chunk_logits(h, w, i, chunk)
        c_max = logits.max(axis=-1)
        new_max = jnp.maximum(run_max, c_max)
        run_sum = (run_sum * jnp.exp(run_max - new_max)
                   + jnp.exp(logits - new_max[..., None]).sum(-1))
        hit = (cols == labels[..., None]) & jnp.isfinite(logits)
        lab = lab + jnp.where(hit, logits, 0.0).sum(-1)
        c_arg = cols[jnp.argmax(logits, axis=-1)]
        better = c_max > best  # strict: ties keep the earlier (lower) id, like a dense argmax
        return (new_max, run_sum, lab, jnp.where(better, c_max, best),
                jnp.where(better, c_arg, arg)), None

    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.int32))
    (run_max, run_sum, lab, _, arg), _ = lax.scan(body, init, jnp.arange(n))
    return run_max + jnp.log(run_sum), lab, arg


def _backward_tokens(h, w, labels, lse, g, chunk):
    """d nll / d h for one token chunk: sum over vocab chunks of (softmax - onehot) @ W_chunk."""
    chunk, n = _vocab_chunks(w.shape[0], chunk)

    def body(dh, i):
        logits, cols, fresh = _chunk_logits(h, w, i, chunk)
        p = jnp.where(fresh, jnp.exp(logits - lse[..., None]), 0.0)
        onehot = (cols == labels[..., None]) & fresh
        d_logits = g[..., None] * (p - onehot)
        start = jnp.minimum(i * chunk, w.shape[0] - chunk)
        w_c = lax.dynamic_slice_in_dim(w, start, chunk, axis=0)
        return dh + jnp.einsum("bmv,vh->bmh", d_logits.astype(w.dtype), w_c,
                               preferred_element_type=jnp.float32), None

    dh, _ = lax.scan(body, jnp.zeros(h.shape, jnp.float32), jnp.arange(n))
    return dh


def _split(x, token_chunk):
    """[b, L, ...] -> [L/t, b, t, ...] (zero-padded), chunk axis first so lax.map walks it while
    the batch axis keeps its sharding; returns (chunks, L)."""
    length = x.shape[1]
    t = min(token_chunk, length)
    pad = -length % t
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], -1, t) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0), length


def _merge(x, length):
    """Inverse of _split: [L/t, b, t, ...] -> [b, L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_nll(h, w, labels, vocab_chunk: int, token_chunk: int):
    """Per-token CE of softmax(h @ w.T) at `labels`, and the argmax, never building the logits.

    h [b, L, H] (any float dtype), w [V, H] (the frozen head, HF layout), labels int [b, L]
    -> (nll f32 [b, L], argmax int32 [b, L]). Chunks walk L and V; b stays whole (and sharded).
    The head is frozen in this project: its cotangent is returned as zeros (no [V, H] gradient
    is ever computed).
    """
    return _fwd(h, w, labels, vocab_chunk, token_chunk)[0]


def _fwd(h, w, labels, vocab_chunk, token_chunk):
    hc, length = _split(h, token_chunk)
    lc, _ = _split(labels, token_chunk)
    lse, lab, arg = lax.map(lambda a: _forward_tokens(a[0], w, a[1], vocab_chunk), (hc, lc))
    lse, lab, arg = (_merge(x, length) for x in (lse, lab, arg))
    return (lse - lab, arg), (h, w, labels, lse)


def _bwd(vocab_chunk, token_chunk, res, cot):
    h, w, labels, lse = res
    g = cot[0]
    hc, length = _split(h, token_chunk)
    lc, _ = _split(labels, token_chunk)
    sc, _ = _split(lse, token_chunk)
    gc, _ = _split(g.astype(jnp.float32), token_chunk)
    dh = lax.map(lambda a: _backward_tokens(a[0], w, a[1], a[2], a[3], vocab_chunk),
                 (hc, lc, sc, gc))
    return _merge(dh, length).astype(h.dtype), jnp.zeros_like(w), None


chunked_nll.defvjp(_fwd, _bwd)


def dflash_loss(hidden, lm_head, labels, supervised, weights, *, vocab_chunk: int,
                token_chunk: int):
    """Decay-weighted CE of slots 1..B-1, normalised by the sum of the weights it applied.

    hidden [b, N, B, H] (draft output, final-normed), lm_head [V, H], labels / supervised
    [b, N, B] (from `train.anchors.block_labels`), weights [B] (`decay_weights`, w[0] = 0).
    Slot 0 is dropped before the CE, so it costs no compute.
    -> (loss scalar, aux dict: weight_sum, per-slot correct [B-1] and supervised counts [B-1]).
    """
    b, n, bs, hd = hidden.shape
    h = hidden[:, :, 1:].reshape(b, n * (bs - 1), hd)  # per-sequence tokens: batch stays sharded
    lab = labels[:, :, 1:].reshape(b, -1)
    sup = supervised[:, :, 1:]
    w_tok = (jnp.asarray(weights, jnp.float32)[1:] * sup).reshape(b, -1)
    nll, pred = chunked_nll(h, lm_head, lab, vocab_chunk, token_chunk)
    w_sum = w_tok.sum()
    loss = (w_tok * nll).sum() / jnp.maximum(w_sum, 1e-9)
    correct = ((pred == lab).reshape(sup.shape) & sup).sum(axis=(0, 1))
    aux = {"weight_sum": w_sum, "slot_correct": correct, "slot_count": sup.sum(axis=(0, 1))}
    return loss, aux
