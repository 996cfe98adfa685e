"""The DFlash draft as one Linen module, `DFlashDraft(config)`: every form is a method of it.

    variables = {"params": params}   # the tree below; `model.draft.as_variables` converts the
                                     # list form that train/ and io.py hold
    DFlashDraft(config).apply(variables, target_hidden, noise_embedding, position_ids)
    DFlashDraft(config).apply(variables, ..., method="train_hidden")   # etc.

Forms (b batch, B block size, H hidden, K feature streams, L layers, Hk kv heads, D head dim):
  __call__        reference inference form: one block after a context, no cache;
  train_hidden    all blocks of a sequence at once, block-sparse attention (training);
  append_context  project context features into a K/V cache at an offset (decoding);
  propose         one block attending to the cached context and itself (decoding);
  embed, block_tokens, logits: the frozen-target ends (embedding, LM head) and block layout.

Why a context K/V cache is exact: a layer's context K/V depend on the context features alone
(fc -> hidden_norm -> k_proj/k_norm/RoPE, v_proj); block hidden states never flow into them.

Params (kernels [in, out]): fc.kernel [K*H, H]; hidden_norm.scale, norm.scale [H];
layers.<i>: input_layernorm, post_attention_layernorm .scale [H]; self_attn: q/k/v/o_proj
{kernel, bias when attention_bias}, q_norm/k_norm.scale [D]; mlp: gate/up/down_proj.kernel.
DFlash2 (config.dflash2 set, model/dflash2.py) adds layers.<i>.attention_conv / mlp_conv
{base_kernel [2, taps, H], kernel_projection.kernel} and candidate_selector {predecessor_codebook,
successor_codebook [V, rank], hidden_projection.kernel}; its methods select_path, propose_path
and selector_scores walk or score the selector (init through init_all to create its params).
The decoder layers are named "0", "1", ... under "layers": exactly flax's state dict of a list,
so `draft_params.msgpack` (list form, serialized) is the serialization of these variables and
the z-lab names (`layers.0.self_attn.q_proj.weight`) are these paths.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import block_sparse_attention, dense_attention, inference_mask, visible
from model.config import DraftConfig
from model.dflash2 import CandidateSelector, DynamicConv
from model.layers import MLP, Linear, RMSNorm
from model.rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    """Qwen3 attention projections with per-head q/k RMSNorm; the attention itself is the
    caller's (each form masks differently)."""

    config: DraftConfig

    def setup(self):
        c = self.config
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        bias = c.attention_bias
        self.q_proj = Linear(q, ("embed", "heads"), bias)
        self.k_proj = Linear(kv, ("embed", "kv"), bias)
        self.v_proj = Linear(kv, ("embed", "kv"), bias)
        self.o_proj = Linear(c.hidden_size, ("heads", "embed"), bias)
        self.q_norm = RMSNorm(c.rms_norm_eps, (None,))
        self.k_norm = RMSNorm(c.rms_norm_eps, (None,))

    def _heads(self, x, n):
        return x.reshape(*x.shape[:-1], n, self.config.head_dim)

    def query(self, h, cos, sin):
        """h [..., S, H] at rope cos/sin [..., S, D] -> q [..., S, Hq, D]."""
        q = self.q_norm(self._heads(self.q_proj(h), self.config.num_attention_heads))
        return apply_rope(q, cos, sin)

    def key_value(self, h, cos, sin):
        """h [..., S, H] -> k, v [..., S, Hk, D] (V carries no rope)."""
        n = self.config.num_key_value_heads
        k = apply_rope(self.k_norm(self._heads(self.k_proj(h), n)), cos, sin)
        return k, self._heads(self.v_proj(h), n)

    def output(self, attn):
        """attn [..., S, Hq, D] -> [..., S, H]."""
        return self.o_proj(attn.reshape(*attn.shape[:-2], -1))


class DraftLayer(nn.Module):
    """One decoder layer, split where the forms differ: the block's q/k/v, then the attention
    (the form's), then o_proj + residual + MLP block (`finish`)."""

    config: DraftConfig
    index: int

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps)
        self.mlp = MLP(c.intermediate_size)
        if c.dflash2 is not None:  # DFlash2: convolutions around both sublayers (model/dflash2.py)
            self.attention_conv = DynamicConv(c)
            self.mlp_conv = DynamicConv(c)

    @property
    def causal(self) -> bool:
        """As Qwen3DFlashAttention decides: sliding layers are causal unless is_causal says."""
        c = self.config
        sliding = c.layer_types[self.index] == "sliding_attention"
        return sliding if c.is_causal is None else bool(c.is_causal)

    @property
    def window(self) -> int | None:
        c = self.config
        return c.sliding_window if c.layer_types[self.index] == "sliding_attention" else None

    def block_qkv(self, x, cos, sin):
        """The block's own q, k, v from its residual stream x [..., B, H]."""
        h = self.input_layernorm(x)
        if self.config.dflash2 is not None:
            h = self.attention_conv.prepare(h)
        return (self.self_attn.query(h, cos, sin), *self.self_attn.key_value(h, cos, sin))

    def context_kv(self, ctx, cos, sin):
        """K, V of fused context features ctx [..., T, H]."""
        return self.self_attn.key_value(ctx, cos, sin)

    def finish(self, x, attn):
        """o_proj + residual, then the MLP block; x [..., B, H] is the layer's input."""
        out = self.self_attn.output(attn)
        if self.config.dflash2 is None:
            x = x + out
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.attention_conv.finish(self.input_layernorm(x), out)
        h = self.post_attention_layernorm(x)
        return x + self.mlp_conv.finish(h, self.mlp(self.mlp_conv.prepare(h)))


class DraftLayers(nn.Module):
    """The decoder layers, named "0".."L-1" (see the module docstring for why)."""

    config: DraftConfig

    def setup(self):
        for i in range(self.config.num_hidden_layers):
            setattr(self, str(i), DraftLayer(self.config, i))

    def each(self) -> list[DraftLayer]:
        return [getattr(self, str(i)) for i in range(self.config.num_hidden_layers)]


def empty_cache(config: DraftConfig, batch: int, capacity: int, dtype=jnp.float32) -> tuple:
    """Zero context K/V cache (k, v), each [L, b, capacity, Hk, D], for append_context/propose."""
    shape = (config.num_hidden_layers, batch, capacity, config.num_key_value_heads,
             config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class DFlashDraft(nn.Module):
    """The DFlash draft; see the module docstring for its forms and params."""

    config: DraftConfig

    def setup(self):
        c = self.config
        self.fc = Linear(c.hidden_size, ("mlp", "embed"))
        self.hidden_norm = RMSNorm(c.rms_norm_eps)
        self.layers = DraftLayers(c)
        self.norm = RMSNorm(c.rms_norm_eps)
        if c.dflash2 is not None:
            self.candidate_selector = CandidateSelector(c)

    def fuse(self, target_hidden):
        """fc + hidden_norm over the K concatenated feature streams [..., K*H] -> [..., H]:
        once, shared by every layer."""
        return self.hidden_norm(self.fc(target_hidden))

    @property
    def _scale(self) -> float:
        return self.config.head_dim ** -0.5

    # -------------------------------------------------------------- inference form
    def __call__(self, target_hidden, noise_embedding, position_ids):
        """One block over a context: the reference forward (no KV cache).

        target_hidden [b, ctx, K*H], noise_embedding [b, B, H], position_ids [b, ctx+B]
        -> final-normed hidden [b, B, H]."""
        ctx = self.fuse(target_hidden)
        n_ctx, n_blk = ctx.shape[1], noise_embedding.shape[1]
        cos, sin = rope_cos_sin(self.config, position_ids)
        x = noise_embedding
        for layer in self.layers.each():
            q, k_blk, v_blk = layer.block_qkv(x, cos[:, n_ctx:], sin[:, n_ctx:])
            k_ctx, v_ctx = layer.context_kv(ctx, cos[:, :n_ctx], sin[:, :n_ctx])
            k = jnp.concatenate([k_ctx, k_blk], axis=1)
            v = jnp.concatenate([v_ctx, v_blk], axis=1)
            mask = inference_mask(n_blk, n_ctx + n_blk, causal=layer.causal, window=layer.window)
            x = layer.finish(x, dense_attention(q, k, v, mask, self._scale))
        return self.norm(x)

    # -------------------------------------------------------------- training form
    def train_hidden(self, target_hidden, block_embedding, anchors, *, seq_positions=None,
                     implementation: str = "xla", chunk_blocks: int | None = None,
                     remat: bool = False):
        """All blocks of a sequence in one forward, with the block-sparse mask.

        target_hidden [b, T, K*H]: features of the whole sequence; block_embedding [b, N, B, H];
        anchors [b, N] int32 in [0, T]: block n sits at positions anchors[n]..anchors[n]+B-1 and
        sees context positions < anchors[n] plus its own block -> [b, N, B, H]. Equals the
        inference form per block with context [0, anchor). Context K/V are projected once for
        the whole sequence per layer, block K/V per block. seq_positions [b, T] optionally
        replaces the RoPE positions of the context (block n then starts at
        seq_positions[anchors[n]]; anchors must be < T). implementation / chunk_blocks: see
        `model.attention.block_sparse_attention`; remat=True recomputes each layer in the
        backward pass."""
        ctx = self.fuse(target_hidden)
        b, t = ctx.shape[:2]
        bs = block_embedding.shape[2]
        if seq_positions is None:
            seq_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            starts = anchors
        else:
            starts = jnp.take_along_axis(seq_positions, jnp.clip(anchors, 0, t - 1), axis=1)
        cos_c, sin_c = rope_cos_sin(self.config, seq_positions)
        cos_b, sin_b = rope_cos_sin(self.config, starts[..., None] + jnp.arange(bs))

        def step(layer, x):
            q, k_blk, v_blk = layer.block_qkv(x, cos_b, sin_b)
            k_ctx, v_ctx = layer.context_kv(ctx, cos_c, sin_c)
            attn = block_sparse_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors,
                                          causal=layer.causal, window=layer.window,
                                          scale=self._scale, implementation=implementation,
                                          chunk_blocks=chunk_blocks)
            return layer.finish(x, attn)

        if remat:
            step = nn.remat(step)
        x = block_embedding
        for layer in self.layers.each():
            x = step(layer, x)
        return self.norm(x)

    # -------------------------------------------------------------- cached decode form
    def append_context(self, cache, features, start):
        """Project features [b, n, K*H] of positions start..start+n-1 (start: int32 scalar) into
        every layer's K/V of cache (k, v) [L, b, S, Hk, D]; returns the updated cache. Rows past
        the real ones may be padding: the next append at the true length overwrites them, and
        `propose` never reads past ctx_len."""
        ks, vs = cache
        ctx = self.fuse(features)
        pos = jnp.broadcast_to(start + jnp.arange(features.shape[1]), features.shape[:2])
        cos, sin = rope_cos_sin(self.config, pos)
        for i, layer in enumerate(self.layers.each()):
            k, v = layer.context_kv(ctx, cos, sin)
            ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), (i, 0, start, 0, 0))
            vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), (i, 0, start, 0, 0))
        return ks, vs

    def propose(self, cache, block_embedding, ctx_len, n_valid):
        """One block after a cached context: block_embedding [b, B, H] at positions
        ctx_len..ctx_len+B-1 sees cache[:, :, :ctx_len] and block rows < n_valid (the block
        may be a padded, shorter tail block); ctx_len, n_valid: int32 scalars.
        -> final-normed hidden [b, B, H]; rows < n_valid equal the inference form on that
        context and the first n_valid block rows."""
        ks, vs = cache
        s, bs = ks.shape[2], block_embedding.shape[1]
        q_pos = ctx_len + jnp.arange(bs)
        k_pos = jnp.concatenate([jnp.arange(s), q_pos])
        exists = jnp.concatenate([jnp.arange(s) < ctx_len, jnp.arange(bs) < n_valid])
        cos, sin = rope_cos_sin(self.config, jnp.broadcast_to(q_pos, block_embedding.shape[:2]))
        x = block_embedding
        for i, layer in enumerate(self.layers.each()):
            q, k_blk, v_blk = layer.block_qkv(x, cos, sin)
            k = jnp.concatenate([ks[i].astype(k_blk.dtype), k_blk], axis=1)
            v = jnp.concatenate([vs[i].astype(v_blk.dtype), v_blk], axis=1)
            mask = exists & visible(q_pos[:, None], k_pos[None, :], causal=layer.causal,
                                    window=layer.window)
            x = layer.finish(x, dense_attention(q, k, v, mask[None], self._scale))
        return self.norm(x)

    # -------------------------------------------------------------- the target's ends
    def embed(self, embedding, tokens):
        """Embed block tokens with the target's frozen embedding [V, H], x input_embedding_scale."""
        return jnp.take(embedding, tokens, axis=0) * jnp.asarray(
            self.config.input_embedding_scale, embedding.dtype)

    def block_tokens(self, input_ids, anchors):
        """[anchor token, MASK x (B-1)] per block: input_ids [b, T], anchors [b, N] -> [b, N, B]."""
        c = self.config
        first = jnp.take_along_axis(input_ids, anchors, axis=1)
        mask = jnp.full((*anchors.shape, c.block_size - 1), c.mask_token_id, input_ids.dtype)
        return jnp.concatenate([first[..., None], mask], axis=-1)

    def logits(self, hidden, lm_head):
        """hidden [..., H] @ lm_head[V, H].T, times logits_scaling, then tanh softcap (if set)."""
        logits = jnp.einsum("...h,vh->...v", hidden, lm_head.astype(hidden.dtype))
        if self.config.logits_scaling is not None:
            logits = logits * self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        if cap is not None and cap > 0:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    # -------------------------------------------------------------- DFlash2 selector
    def init_all(self, target_hidden, noise_embedding, position_ids):
        """The inference form, plus the selector's params for DFlash2 (init through this: the
        forward alone never touches the selector)."""
        hidden = self(target_hidden, noise_embedding, position_ids)
        if self.config.dflash2 is not None:
            ids = jnp.zeros(hidden.shape[:-1], jnp.int32)
            self.candidate_selector.transition(hidden, ids, ids[..., None])
        return hidden

    def selector_scores(self, unary, hidden, predecessor_ids, candidate_ids):
        """DFlash2: selector logits [..., K] of candidate_ids [..., K] whose unary logits are
        `unary` [..., K], for hidden [..., H] after predecessor_ids [...]."""
        return self.candidate_selector.scores(unary, hidden, predecessor_ids, candidate_ids)

    def select_path(self, hidden, lm_head, anchor_ids, temperature, uniforms):
        """DFlash2 `propose`: hidden [b, n, H] of slots 1..n -> (path, candidates, q), see
        CandidateSelector.walk; the unary logits are `logits(hidden)`."""
        return self.candidate_selector.walk(hidden, self.logits(hidden, lm_head), anchor_ids,
                                            temperature, uniforms)

    def propose_path(self, cache, embedding, lm_head, tokens, ctx_len, n_valid, temperature,
                     uniforms):
        """DFlash2 decode: tokens [b, B] = [anchor, MASK...] -> (path, candidates, q) of slots
        1..B-1 (rows past n_valid - 1 are padding)."""
        hidden = self.propose(cache, self.embed(embedding, tokens), ctx_len, n_valid)
        return self.select_path(hidden[:, 1:], lm_head, tokens[:, 0], temperature, uniforms)

    def propose_logits(self, cache, embedding, lm_head, tokens, ctx_len, n_valid):
        """tokens [b, B] = [anchor, MASK...] -> draft logits [b, B, V] (row 0 is the anchor's)."""
        hidden = self.propose(cache, self.embed(embedding, tokens), ctx_len, n_valid)
        return self.logits(hidden, lm_head)
