"""Speculative decoding loop (DFlash and n-gram proposers), plain AR decoding, rejection sampling.

Semantics follow the reference `dflash.model.dflash_generate` step for step, so the accepted-length
sequences can be compared with it: prefill emits the first token; each step verifies a block
[anchor, d_1..d_{v-1}] with v = min(block_size, max_length - start); a = longest prefix with
d_k == target argmax at slot k-1; block[0..a] plus the target's token at slot a are committed;
`produced` = a + 1, cut at max_length and after a stop token; the features of the `produced`
committed positions join the draft context; the bonus token is the next anchor.

Targets and proposers are duck-typed adapters (pipeline.speculative.target / draft_cached, or the
naive recompute-everything ones in pipeline.speculative.naive):
  target.reset(capacity); target.run(tokens, start, n_valid, pad_to) -> (logits [n, V], feats [n, F])
  proposer.reset(capacity); proposer.commit(feats); proposer.propose(seq, v, temperature, rng)
    -> (tokens [<= v-1], q [len, V] or None)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.speculative.target import bucket


@dataclass
class Generation:
    """One prompt's decode: new tokens and per-step facts."""
    tokens: list
    accept_lengths: list = field(default_factory=list)  # `produced` per verify step (reference's)
    accepted: list = field(default_factory=list)  # draft tokens accepted per step (a)
    proposed: list = field(default_factory=list)  # draft tokens proposed per step (v - 1)
    target_forwards: int = 0
    seconds: float = 0.0


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sample_from(probs: np.ndarray, r: float) -> int:
    """Inverse-CDF draw with a given uniform r in [0, 1): pure, so tests can drive it."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, r * cdf[-1], side="right"), len(probs) - 1))


def rejection_sample(draft_tokens, p, q, u, r) -> tuple[int, int]:
    """Standard speculative rejection sampling (Leviathan et al.), pure in its uniforms.

    draft_tokens [g]; p [g+1, V] target probs of slots 0..g; q [g, V] draft probs; u [g] and r
    uniforms. Token k is accepted while u_k * q(d_k) < p(d_k); at the first rejection the next
    token is drawn from max(p - q, 0) (renormalised; p itself when that is all zero); if every
    token is accepted, the bonus is drawn from p[g]. Returns (accepted count, next token).
    """
    g = len(draft_tokens)
    idx = np.arange(g)
    pt, qt = p[idx, draft_tokens], q[idx, draft_tokens]
    accepted = int(np.cumprod(np.asarray(u)[:g] * qt < pt).sum())
    if accepted == g:
        return g, sample_from(p[g], r)
    residual = np.maximum(p[accepted] - q[accepted], 0.0)
    if residual.sum() <= 0:
        residual = p[accepted]
    return accepted, sample_from(residual, r)


def _pick(logits, temperature, rng):
    if temperature <= 0:
        return int(np.argmax(logits))
    return sample_from(softmax(logits, temperature), rng.random())


def speculative_generate(target, proposer, prompt, *, max_new_tokens, block_size, mask_token_id,
                         temperature=0.0, rng=None, stop_ids=(), capacity=None) -> Generation:
    """DFlash-style speculative decoding of one prompt (batch 1). Lossless for greedy.
    capacity: cache length (default: enough for this prompt); one value for many prompts keeps
    the compiled shapes the same across them."""
    rng = rng if rng is not None else np.random.default_rng(0)
    t0 = time.perf_counter()
    n = len(prompt)
    max_length = n + max_new_tokens
    capacity = capacity or bucket(n, 64) + max_new_tokens + 2 * block_size
    target.reset(capacity)
    proposer.reset(capacity)
    logits, feats = target.run(np.asarray(prompt, np.int32), 0, n, bucket(n, 64))
    out = list(prompt) + [_pick(logits[-1], temperature, rng)]
    gen = Generation(tokens=[], target_forwards=1)
    proposer.commit(feats)
    start = n
    stopped = out[start] in stop_ids
    while start + 1 < max_length and not stopped:
        v = min(block_size, max_length - start)
        draft, q = proposer.propose(out[: start + 1], v, temperature, rng) if v > 1 else ([], None)
        block = [out[start]] + list(draft)
        t_logits, t_feats = target.run(np.asarray(block, np.int32), start, len(block), block_size)
        gen.target_forwards += 1
        if temperature > 0:
            p = softmax(t_logits, temperature)
            if draft and q is None:  # deterministic proposer (n-gram): q is one-hot
                q = np.zeros((len(draft), p.shape[-1]))
                q[np.arange(len(draft)), draft] = 1.0
            a, bonus = rejection_sample(np.asarray(draft, np.int64), p, q, rng.random(len(draft)),
                                        rng.random()) if draft else (0, sample_from(p[0], rng.random()))
        else:
            post = np.argmax(t_logits, axis=-1)
            a = int(np.cumprod(np.asarray(draft) == post[: len(draft)]).sum()) if draft else 0
            bonus = int(post[a])
        out = out[: start + 1] + block[1 : a + 1] + [bonus]
        produced = min(a + 1, max_length - start - 1)
        hits = [i for i, t in enumerate(out[start + 1 : start + produced + 1]) if t in stop_ids]
        if hits:
            produced, stopped = hits[0] + 1, True
        gen.accept_lengths.append(produced)
        gen.accepted.append(a)
        gen.proposed.append(len(draft))
        proposer.commit(t_feats[:produced])
        start += produced
        out = out[: start + 1]
    gen.tokens = out[n:]
    gen.seconds = time.perf_counter() - t0
    return gen


def ar_generate(target, prompt, *, max_new_tokens, temperature=0.0, rng=None, stop_ids=(),
                capacity=None) -> Generation:
    """Plain autoregressive decoding with the same target (one forward per token)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    t0 = time.perf_counter()
    n = len(prompt)
    target.reset(capacity or bucket(n, 64) + max_new_tokens + 2)
    logits, _ = target.run(np.asarray(prompt, np.int32), 0, n, bucket(n, 64))
    out = [_pick(logits[-1], temperature, rng)]
    gen = Generation(tokens=out, target_forwards=1)
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        logits, _ = target.run(np.asarray(out[-1:], np.int32), n + len(out) - 1, 1, 1)
        gen.target_forwards += 1
        out.append(_pick(logits[-1], temperature, rng))
    gen.seconds = time.perf_counter() - t0
    return gen


class NgramProposer:
    """Model-free baseline: prompt lookup. The longest recent n-gram suffix (max_ngram..1) that
    occurred earlier proposes the tokens that followed it, up to v - 1 of them."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def reset(self, capacity):
        pass

    def commit(self, feats):
        pass

    def propose(self, seq, v, temperature, rng):
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            pattern = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # most recent earlier occurrence
                if seq[i : i + n] == pattern:
                    return list(seq[i + n : i + n + v - 1]), None
        return [], None


class DFlashProposer:
    """The DFlash draft as a proposer: one draft forward per block over its context cache."""

    def __init__(self, draft, block_size: int, mask_token_id: int):
        self.draft, self.block_size, self.mask = draft, block_size, mask_token_id

    def reset(self, capacity):
        self.draft.reset(capacity)

    def commit(self, feats):
        self.draft.extend(feats)

    def propose(self, seq, v, temperature, rng):
        if getattr(self.draft.config, "dflash2", None) is not None:
            return self._propose_dflash2(seq, v, temperature, rng)
        logits = self.draft.logits(np.asarray([seq[-1]] + [self.mask] * (v - 1), np.int32), self.block_size)
        if temperature <= 0:
            return [int(t) for t in np.argmax(logits, axis=-1)], None
        q = softmax(logits, temperature)
        return [sample_from(row, rng.random()) for row in q], q

    def _propose_dflash2(self, seq, v, temperature, rng):
        """DFlash2: the selector's path through each slot's top-K candidates (greedy, or drawn
        with this loop's uniforms); q is its distribution over the K candidates, scattered into
        the vocabulary (0 elsewhere) for the rejection sampler, as the reference verifies it."""
        u = rng.random(v - 1) if temperature > 0 else np.zeros(v - 1)
        block = np.asarray([seq[-1]] + [self.mask] * (v - 1), np.int32)
        tokens, cands, q_k = self.draft.path(block, self.block_size, temperature, u)
        if temperature <= 0:
            return [int(t) for t in tokens], None
        q = np.zeros((v - 1, self.draft.config.vocab_size))
        np.put_along_axis(q, cands.astype(np.int64), q_k, axis=1)
        return [int(t) for t in tokens], q
