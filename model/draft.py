"""The DFlash draft as pure functions over a plain params pytree.

Params (Flax layout, kernels [in, out]; `layers` is a list, one dict per draft layer):
  fc.kernel [K*H, H]; hidden_norm.scale [H]; norm.scale [H];
  layers[i]: input_layernorm.scale, post_attention_layernorm.scale [H];
    self_attn: q_proj/k_proj/v_proj/o_proj {kernel, bias when attention_bias},
      q_norm/k_norm.scale [D];
    mlp: gate_proj/up_proj [H, F], down_proj [F, H] kernels.
The target's embedding and LM head are not draft params: they are passed in, frozen.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from model.attention import block_sparse_attention, dense_attention, inference_mask
from model.config import DraftConfig
from model.layers import linear, mlp, rms_norm
from model.rope import apply_rope, rope_cos_sin

# ------------------------------------------------------------------ params


def _layer_shapes(c: DraftConfig) -> dict:
    h, f, q, kv, d = (c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim,
                      c.num_key_value_heads * c.head_dim, c.head_dim)
    # (shape, logical axes) per param; logical names are mapped to mesh axes by the trainer.

    def proj(i, o, axes):
        bias = {"bias": ((o,), axes[1:])} if c.attention_bias else {}
        return {"kernel": ((i, o), axes), **bias}

    return {
        "input_layernorm": {"scale": ((h,), ("embed",))},
        "post_attention_layernorm": {"scale": ((h,), ("embed",))},
        "self_attn": {
            "q_proj": proj(h, q, ("embed", "heads")),
            "k_proj": proj(h, kv, ("embed", "kv")),
            "v_proj": proj(h, kv, ("embed", "kv")),
            "o_proj": proj(q, h, ("heads", "embed")),
            "q_norm": {"scale": ((d,), (None,))},
            "k_norm": {"scale": ((d,), (None,))},
        },
        "mlp": {
            "gate_proj": {"kernel": ((h, f), ("embed", "mlp"))},
            "up_proj": {"kernel": ((h, f), ("embed", "mlp"))},
            "down_proj": {"kernel": ((f, h), ("mlp", "embed"))},
        },
    }


def _shapes(c: DraftConfig) -> dict:
    h = c.hidden_size
    return {
        "fc": {"kernel": ((c.num_features * h, h), ("mlp", "embed"))},
        "hidden_norm": {"scale": ((h,), ("embed",))},
        "norm": {"scale": ((h,), ("embed",))},
        "layers": [_layer_shapes(c) for _ in range(c.num_hidden_layers)],
    }


def _is_leaf(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_logical_axes(config: DraftConfig) -> dict:
    """Same structure as the params; each leaf a PartitionSpec of logical axis names, one per dim.

    Names: embed, heads, kv, mlp (None = replicated); the trainer maps them to mesh axes (e.g.
    flax.linen.logical_to_mesh_axes with its rules table). A PartitionSpec, unlike a tuple, is a
    pytree leaf, so jax.tree.map(f, params, axes) pairs each param with its names."""
    return jax.tree.map(lambda leaf: PartitionSpec(*leaf[1]), _shapes(config), is_leaf=_is_leaf)


def param_shapes(config: DraftConfig) -> dict:
    """Same structure as the params; each leaf the param's shape tuple."""
    return jax.tree.map(lambda leaf: leaf[0], _shapes(config), is_leaf=_is_leaf)


@functools.partial(jax.jit, static_argnums=0, static_argnames="dtype")
def init_draft_params(config: DraftConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Reference initialisation: kernels ~ N(0, 0.02), biases 0, norm scales 1.

    Jitted; inside a caller's jit it inlines, so the trainer can jit it with out_shardings to
    create the params already sharded. All kernels come from ONE normal draw, sliced: on CPU each
    threefry op costs ~1 s of compile, which made a per-leaf init slower than the forward pass
    (the price is a transient float32 copy of the kernels)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(_shapes(config), is_leaf=_is_leaf)
    sizes = [math.prod(shape) if path[-1].key == "kernel" else 0 for path, (shape, _) in paths]
    draw = 0.02 * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    leaves, offset = [], 0
    for size, (path, (shape, _)) in zip(sizes, paths):
        kind = path[-1].key
        if kind == "kernel":
            leaves.append(draw[offset:offset + size].reshape(shape))
            offset += size
        else:
            leaves.append(jnp.full(shape, 0.0 if kind == "bias" else 1.0, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, [x.astype(dtype) for x in leaves])


# ------------------------------------------------------------------ helpers


def embed_block(config: DraftConfig, embedding: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Embed block tokens with the target's frozen embedding [V, H], x input_embedding_scale."""
    return jnp.take(embedding, tokens, axis=0) * jnp.asarray(config.input_embedding_scale,
                                                              embedding.dtype)


def block_tokens(config: DraftConfig, input_ids: jnp.ndarray, anchors: jnp.ndarray) -> jnp.ndarray:
    """[anchor token, MASK x (B-1)] per block: input_ids [b, T], anchors [b, N] -> [b, N, B]."""
    first = jnp.take_along_axis(input_ids, anchors, axis=1)
    mask = jnp.full((*anchors.shape, config.block_size - 1), config.mask_token_id, input_ids.dtype)
    return jnp.concatenate([first[..., None], mask], axis=-1)


def draft_logits(config: DraftConfig, hidden: jnp.ndarray, lm_head: jnp.ndarray) -> jnp.ndarray:
    """hidden [..., H] @ lm_head[V, H].T, times logits_scaling, then tanh softcap (if set)."""
    logits = jnp.einsum("...h,vh->...v", hidden, lm_head.astype(hidden.dtype))
    if config.logits_scaling is not None:
        logits = logits * config.logits_scaling
    cap = config.final_logit_softcapping
    if cap is not None and cap > 0:
        logits = jnp.tanh(logits / cap) * cap
    return logits


def _layer_kind(config: DraftConfig, i: int) -> tuple[bool, int | None]:
    """(causal, window) of layer i, as Qwen3DFlashAttention decides them."""
    sliding = config.layer_types[i] == "sliding_attention"
    causal = sliding if config.is_causal is None else bool(config.is_causal)
    return causal, (config.sliding_window if sliding else None)


def _heads(config, p, name, norm, h, num_heads, cos, sin):
    x = linear(p[name], h)
    x = x.reshape(*x.shape[:-1], num_heads, config.head_dim)
    if norm is not None:
        x = rms_norm(p[norm], x, config.rms_norm_eps)
        x = apply_rope(x, cos, sin)
    return x


def _kv(config, p, h, cos, sin):
    """K, V heads of h [..., S, H] at rope cos/sin [..., S, D] (V carries no rope)."""
    hk = config.num_key_value_heads
    return (_heads(config, p, "k_proj", "k_norm", h, hk, cos, sin),
            _heads(config, p, "v_proj", None, h, hk, cos, sin))


def _q(config, p, h, cos, sin):
    return _heads(config, p, "q_proj", "q_norm", h, config.num_attention_heads, cos, sin)


def _fuse(config, params, target_hidden):
    """fc + hidden_norm over the K concatenated feature streams: once, shared by every layer."""
    return rms_norm(params["hidden_norm"], linear(params["fc"], target_hidden), config.rms_norm_eps)


def _finish_layer(config, p, x, attn):
    """o_proj + residual, then the SwiGLU MLP block + residual."""
    x = x + linear(p["self_attn"]["o_proj"], attn.reshape(*attn.shape[:-2], -1))
    return x + mlp(p["mlp"], rms_norm(p["post_attention_layernorm"], x, config.rms_norm_eps))


# ------------------------------------------------------------------ inference form


def draft_hidden(config: DraftConfig, params: dict, target_hidden: jnp.ndarray,
                 noise_embedding: jnp.ndarray, position_ids: jnp.ndarray) -> jnp.ndarray:
    """One block over a context: the reference forward (no KV cache).

    target_hidden [b, ctx, K*H], noise_embedding [b, B, H], position_ids [b, ctx+B]
    -> final-normed hidden [b, B, H].
    """
    ctx = _fuse(config, params, target_hidden)
    n_ctx, n_blk = ctx.shape[1], noise_embedding.shape[1]
    cos, sin = rope_cos_sin(config, position_ids)
    scale = config.head_dim ** -0.5
    x = noise_embedding
    for i, p in enumerate(params["layers"]):
        causal, window = _layer_kind(config, i)
        h = rms_norm(p["input_layernorm"], x, config.rms_norm_eps)
        a = p["self_attn"]
        q = _q(config, a, h, cos[:, n_ctx:], sin[:, n_ctx:])
        k_blk, v_blk = _kv(config, a, h, cos[:, n_ctx:], sin[:, n_ctx:])
        k_ctx, v_ctx = _kv(config, a, ctx, cos[:, :n_ctx], sin[:, :n_ctx])
        k = jnp.concatenate([k_ctx, k_blk], axis=1)
        v = jnp.concatenate([v_ctx, v_blk], axis=1)
        mask = inference_mask(n_blk, n_ctx + n_blk, causal=causal, window=window)
        x = _finish_layer(config, p, x, dense_attention(q, k, v, mask, scale))
    return rms_norm(params["norm"], x, config.rms_norm_eps)


# ------------------------------------------------------------------ training form


def draft_hidden_train(config: DraftConfig, params: dict, target_hidden: jnp.ndarray,
                       block_embedding: jnp.ndarray, anchors: jnp.ndarray, *,
                       seq_positions: jnp.ndarray | None = None, implementation: str = "xla",
                       chunk_blocks: int | None = None, remat: bool = False) -> jnp.ndarray:
    """All blocks of a sequence in one forward, with the block-sparse mask.

    target_hidden [b, T, K*H]: features of the whole sequence; block_embedding [b, N, B, H];
    anchors [b, N] int32 in [0, T]: block n sits at positions anchors[n]..anchors[n]+B-1 and sees
    context positions < anchors[n] plus its own block -> [b, N, B, H]. Equals `draft_hidden`
    per block with context [0, anchor). Context K/V are projected once for the whole sequence
    per layer, block K/V per block. seq_positions [b, T] optionally replaces the RoPE positions of
    the context (block n then starts at seq_positions[anchors[n]]; anchors must be < T).
    implementation / chunk_blocks: see `model.attention.block_sparse_attention`; remat=True
    recomputes each layer in the backward pass.
    """
    ctx = _fuse(config, params, target_hidden)
    b, t = ctx.shape[:2]
    bs = block_embedding.shape[2]
    if seq_positions is None:
        seq_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        starts = anchors
    else:
        starts = jnp.take_along_axis(seq_positions, jnp.clip(anchors, 0, t - 1), axis=1)
    cos_c, sin_c = rope_cos_sin(config, seq_positions)
    cos_b, sin_b = rope_cos_sin(config, starts[..., None] + jnp.arange(bs))
    scale = config.head_dim ** -0.5

    def layer(i, p, x):
        causal, window = _layer_kind(config, i)
        h = rms_norm(p["input_layernorm"], x, config.rms_norm_eps)
        q = _q(config, p["self_attn"], h, cos_b, sin_b)
        k_blk, v_blk = _kv(config, p["self_attn"], h, cos_b, sin_b)
        k_ctx, v_ctx = _kv(config, p["self_attn"], ctx, cos_c, sin_c)
        attn = block_sparse_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors, causal=causal,
                                      window=window, scale=scale, implementation=implementation,
                                      chunk_blocks=chunk_blocks)
        return _finish_layer(config, p, x, attn)

    x = block_embedding
    for i, p in enumerate(params["layers"]):
        fn = (lambda p_, x_, i=i: layer(i, p_, x_))
        x = (jax.checkpoint(fn) if remat else fn)(p, x)
    return rms_norm(params["norm"], x, config.rms_norm_eps)
