"""`--naive` oracles: recompute everything, every step, through the project's official forwards.

The target is `pipeline.teacher.easydel_teacher.Teacher` (EasyDeL, with our fixes) run over the whole sequence;
the draft is `model.draft_hidden` over the whole context. No caches, no padding tricks: slow,
obviously right, and the reference that the cached adapters must equal token for token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.errors import UserError
from pipeline.speculative.target import bucket


class NaiveTarget:
    """Target adapter over a Teacher: every run() is a full forward over sequence[:start] + tokens."""

    def __init__(self, teacher, feature_layers):
        self.teacher = teacher
        self.layer_ids = [int(i) for i in feature_layers]
        self.seq: list = []

    def reset(self, capacity):
        self.seq = []

    def run(self, tokens, start, n_valid, pad_to):
        self.seq = self.seq[:start] + [int(t) for t in tokens[:n_valid]]
        n = len(self.seq)
        # right padding (masked) so the teacher compiles once per 32-token bucket; a causal
        # forward makes the valid rows independent of what follows them
        ids = np.zeros((1, bucket(n, 32)), np.int32)
        ids[0, :n] = self.seq
        mask = (np.arange(ids.shape[1]) < n)[None]
        logits, feats = self.teacher.forward(ids, mask, self.layer_ids, logits="all")
        return (np.asarray(logits, np.float32)[0, start:n], np.asarray(feats, np.float32)[0, start:n])


class NaiveDraft:
    """Draft adapter over `model.draft_hidden`: the whole context every block."""

    def __init__(self, path, embedding, lm_head):
        import model

        self.config, params = model.load_draft(path)
        if self.config.dflash2 is not None:
            raise UserError(f"{path}: --naive runs DFlash drafts only (this one is DFlash2)")
        self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        self.embedding = jnp.asarray(embedding, jnp.float32)
        self.lm_head = jnp.asarray(lm_head, jnp.float32)
        self.ctx = None

    def reset(self, capacity):
        self.ctx = None

    def extend(self, feats):
        feats = jnp.asarray(feats, jnp.float32)
        self.ctx = feats if self.ctx is None else jnp.concatenate([self.ctx, feats])

    def logits(self, block_ids, block_size):
        import model

        n_ctx, n = self.ctx.shape[0], len(block_ids)
        noise = model.embed_block(self.config, self.embedding, jnp.asarray(block_ids)[None])
        pos = jnp.arange(n_ctx + n)[None]
        hidden = model.draft_hidden(self.config, self.params, self.ctx[None], noise, pos)
        return np.asarray(model.draft_logits(self.config, hidden[0, 1:], self.lm_head))
