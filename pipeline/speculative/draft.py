"""The harness's draft adapter: `model.DFlashDraft`'s KV-cached decode form behind the loop's
duck-typed interface (reset / extend / logits).

Why a cache is exact, the masks and the parity with the reference `dflash.model.DFlashDraftModel`
are the module's (model/module.py, tests/test_model_module.py); this file only holds the cache,
its length and the padding that keeps jit to one compile per bucket. The oracle is
`model.draft_hidden` over the whole context (`--naive`, pipeline/speculative/naive.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import model
from pipeline.errors import UserError
from pipeline.speculative.target import bucket


@functools.lru_cache(maxsize=None)
def _compiled(config: model.DraftConfig):
    """(append_context, propose_logits), jitted once per config (every start / length / block
    fill is a traced int32, so one compile per padded shape). The cache is donated: each append
    writes it in place."""
    m = model.DFlashDraft(config)
    append = jax.jit(functools.partial(m.apply, method="append_context"), donate_argnums=1)
    method = "propose_logits" if config.dflash2 is None else "propose_path"
    propose = jax.jit(functools.partial(m.apply, method=method))
    return append, propose


class CachedDraft:
    """Draft adapter for pipeline.speculative.loop: append committed features, propose a block."""

    def __init__(self, path, embedding, lm_head):
        self.config, params = model.load_draft(path, dtype=jnp.float32)
        self.variables = model.as_variables(params)
        self.module = model.DFlashDraft(self.config)
        self._append, self._propose = _compiled(self.config)
        self.embedding, self.lm_head = jnp.asarray(embedding), jnp.asarray(lm_head)
        self.cache, self.ctx_len = None, 0

    def reset(self, capacity: int):
        self.cache, self.ctx_len = model.empty_cache(self.config, 1, bucket(capacity, 256)), 0

    def extend(self, feats):
        """Append features [n, K*H] of the next n committed positions."""
        n = feats.shape[0]
        pad = bucket(n, 16) if n <= 16 else bucket(n, 64)  # steps: <= B rows; prefill: 64s
        if self.ctx_len + pad > self.cache[0].shape[2]:
            raise UserError("draft context exceeds its cache")
        buf = np.zeros((pad, feats.shape[1]), np.float32)
        buf[:n] = np.asarray(feats, np.float32)
        self.cache = self._append(self.variables, self.cache, jnp.asarray(buf)[None],
                                  jnp.int32(self.ctx_len))
        self.ctx_len += n

    def logits(self, block_ids: np.ndarray, block_size: int) -> np.ndarray:
        """block_ids [n] = [anchor, MASK...] at positions ctx_len..; -> logits of slots 1..n-1."""
        n = len(block_ids)
        buf = np.full(block_size, self.config.mask_token_id, np.int32)
        buf[:n] = block_ids
        logits = self._propose(self.variables, self.cache, self.embedding, self.lm_head,
                               jnp.asarray(buf)[None], jnp.int32(self.ctx_len), jnp.int32(n))
        return np.asarray(logits)[0, 1:n]

    def path(self, block_ids: np.ndarray, block_size: int, temperature: float,
             uniforms: np.ndarray):
        """DFlash2: the selector's path from block_ids [n] = [anchor, MASK...] (model
        CandidateSelector.walk; uniforms [n-1] drive its draws when temperature > 0)
        -> (tokens [n-1], candidates [n-1, K], q [n-1, K])."""
        n = len(block_ids)
        buf = np.full(block_size, self.config.mask_token_id, np.int32)
        buf[:n] = block_ids
        u = np.zeros(block_size - 1, np.float32)
        u[:n - 1] = uniforms
        path, cands, q = self._propose(self.variables, self.cache, self.embedding, self.lm_head,
                                       jnp.asarray(buf)[None], jnp.int32(self.ctx_len),
                                       jnp.int32(n), jnp.float32(temperature),
                                       jnp.asarray(u)[None])
        return (np.asarray(path)[0, :n - 1], np.asarray(cands)[0, :n - 1],
                np.asarray(q, np.float64)[0, :n - 1])
