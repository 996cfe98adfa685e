"""GPT-OSS target with a KV cache, in pure JAX: the one decoder for regeneration (batched,
pipeline.speculative.generate) and speculative decoding (`CachedTarget`, one sequence).

Why our own forward: EasyDeL 0.3.0's cache path does not go through the fixes of
`pipeline.teacher.fixes` (sliding window width, MoE softmax, RoPE truncate), and a verify step
needs "B new tokens on top of a cache, then roll back the rejected ones". The cache is a fixed
buffer per layer: a step writes slots slot..slot+n-1, and a query at slot q only reads keys
<= q, so entries of rejected tokens are never read and rolling back is free (the next step
overwrites them). `--naive` (the EasyDeL Teacher recomputing everything) and HF torch are the
oracles this module is tested against.

Semantics follow HF `GptOssForCausalLM`: attention sinks, sliding layers see keys with
q - k < window, top-k router with softmax over the selected logits, clamped GLU experts, only
the routed experts computed (pipeline.speculative.moe). Weights, dtype and mesh:
pipeline.speculative.weights (bf16 or float32; tensor-parallel over "model", batch over "data";
the whole layer stack runs in one shard_map, so every collective is one we wrote).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model import rope
from pipeline.errors import UserError
from pipeline.speculative.moe import routed_experts
from pipeline.speculative.weights import (DATA, MODEL, TargetShape, decoder_mesh, default_devices,
                                          load_hf_config, load_target, param_specs)

__all__ = ["TargetShape", "load_target", "load_hf_config", "forward", "forward_rows",
           "new_cache", "new_row_cache", "logits_of", "CachedTarget", "bucket"]

CACHE_SPEC = P(DATA, MODEL, None, None)  # [b, kv, ...]: rows over data, KV heads over model


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps))


def _linear(s: TargetShape, x, w, b):
    """x [m, in] @ w[out, in].T + b, in the compute dtype with float32 accumulation."""
    y = jax.lax.dot_general(x.astype(s.jnp_dtype), w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y + b


def _attention(s: TargetShape, lay, x, cos, sin, k_cache, v_cache, slot, first, sliding):
    """One model shard's heads. x [b, n, H] written at the shared cache slots slot..slot+n-1; row
    r's tokens sit at positions slot - first[r] ..., and its keys at slots < first[r] are padding,
    never read. k_cache [b, kv, hd, S], v_cache [b, kv, S, hd] (this shard's KV heads) ->
    (all-reduced out [b, n, H], caches).

    Every row writes the same slots, so the new keys/values go in with one dynamic_update_slice
    per cache, which XLA does in place inside generate's while loop (a scatter at per-row
    positions cost ~1 ms per cache and step at batch 64 on the CPU, half the decode step). A query
    at slot q of row r sees keys at first[r] <= k <= q (and q - k < window on sliding layers): the
    same keys at the same relative positions as the row alone. Sliding layers read only the
    window + n - 1 slots ending at the last query (one dynamic_slice, the same for every row),
    not the whole cache. The layouts are the ones XLA's batched dots take as they are (batch
    dims, then contraction last for K^T / first for V)."""
    b, n, _ = x.shape
    hd = s.head_dim
    heads, kvh = lay["q_proj"].shape[0] // hd, lay["k_proj"].shape[0] // hd
    flat = x.reshape(b * n, -1)
    q = _linear(s, flat, lay["q_proj"], lay["q_proj_b"]).reshape(b * n, heads, hd)
    k = _linear(s, flat, lay["k_proj"], lay["k_proj_b"]).reshape(b * n, kvh, hd)
    v = _linear(s, flat, lay["v_proj"], lay["v_proj_b"]).reshape(b, n, kvh, hd)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin).reshape(v.shape)
    dt = k_cache.dtype
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(dt), (0, 0, 0, slot))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(dt), (0, 0, slot, 0))
    size = k_cache.shape[-1]
    kc, vc, k_start, span = k_cache, v_cache, 0, size
    if sliding and s.sliding_window + n - 1 < size:
        span = s.sliding_window + n - 1
        k_start = jnp.clip(slot - s.sliding_window + 1, 0, size - span)
        kc = jax.lax.dynamic_slice_in_dim(k_cache, k_start, span, axis=3)
        vc = jax.lax.dynamic_slice_in_dim(v_cache, k_start, span, axis=2)
    groups = heads // kvh
    # Queries as [b, kv, groups*n, hd]: the dots then have exactly two batch dims and one free dim
    # per side. With n as its own dim between them ("bnkgd,bkds->bkgns") XLA's CPU dot ran ~6x
    # slower at decode (n=1, batch 64: 1.3 vs 0.2 ms per layer and dot).
    qg = q.reshape(b, n, kvh, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * n, hd)
    scores = jnp.einsum("bkqd,bkds->bkqs", qg.astype(dt), kc,
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = scores.reshape(b, kvh, groups, n, span)
    q_slot = (slot + jnp.arange(n))[None, :, None]  # [1, n, 1]
    k_slot = (k_start + jnp.arange(span))[None, None, :]
    visible = (k_slot <= q_slot) & (k_slot >= first[:, None, None])  # [b, n, span]
    if sliding:
        visible &= (q_slot - k_slot) < s.sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    sink = lay["sinks"].reshape(1, kvh, groups, 1, 1)
    top = jnp.maximum(jnp.max(scores, -1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    probs = e / (jnp.sum(e, -1, keepdims=True) + jnp.exp(sink - top))
    probs = probs.reshape(b, kvh, groups * n, span).astype(dt)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vc, preferred_element_type=jnp.float32)
    out = out.reshape(b, kvh, groups, n, hd).transpose(0, 3, 1, 2, 4).reshape(b * n, heads * hd)
    partial = jax.lax.dot_general(out.astype(s.jnp_dtype), lay["o_proj"], (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    out = jax.lax.psum(partial, MODEL) + lay["o_proj_b"]
    return out.reshape(b, n, -1), k_cache, v_cache


def _embed(s: TargetShape, table, tokens):
    """Rows of the (vocab-sharded) embedding: each shard looks up the ids it holds, zeros
    elsewhere, and the all-reduce adds exactly one non-zero row per token."""
    if not s.vocab_sharded:
        return table[tokens].astype(jnp.float32)
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(MODEL) * rows
    ok = (local >= 0) & (local < rows)
    x = jnp.where(ok[..., None], table[jnp.clip(local, 0, rows - 1)].astype(jnp.float32), 0.0)
    return jax.lax.psum(x, MODEL)


def _local_forward(s: TargetShape, with_features: bool, params, ks, vs, tokens, slot, first):
    b, n = tokens.shape
    x = _embed(s, params["embed"], tokens)
    positions = jnp.maximum(slot + jnp.arange(n)[None, :] - first[:, None], 0).reshape(-1)
    cos, sin = rope.cos_sin(params["inv_freq"], params["rope_scale"], positions)
    feats, new_k, new_v = {}, [], []
    for i, lay in enumerate(params["layers"]):
        h, kc, vc = _attention(s, lay, rms_norm(x, lay["ln1"], s.eps), cos, sin, ks[i], vs[i],
                               slot, first, s.layer_sliding[i])
        x = x + h
        x = x + routed_experts(s, lay, rms_norm(x, lay["ln2"], s.eps).reshape(b * n, -1)).reshape(b, n, -1)
        new_k.append(kc)
        new_v.append(vc)
        if with_features and i in s.feature_layers:
            feats[i] = x
    features = (jnp.concatenate([feats[i] for i in s.feature_layers], -1)
                if with_features else jnp.zeros((b, n, 0), jnp.float32))
    return rms_norm(x, params["norm"], s.eps), features, tuple(new_k), tuple(new_v)


def forward_rows(s: TargetShape, params, cache, tokens, slot, first, *, with_features=False):
    """tokens [b, n] written at the shared cache slots slot..slot+n-1; row r's sequence starts at
    slot first[r] (its token at slot j has position j - first[r]; slots before first[r] hold left
    padding and are never read) -> (final-normed hidden [b, n, H] float32, features [b, n, K*H]
    (empty unless with_features), new cache). cache = (K, V), tuples of L arrays [b, kv, hd, S]
    / [b, kv, S, hd] (per layer, so no step restacks them; `new_row_cache`); S must be >= slot + n
    (dynamic_update_slice would clamp otherwise). b must be a multiple of the mesh's data axis.

    Not jitted on its own: it is traced into the caller's program (generate's loop, `forward`)."""
    ks, vs = cache
    specs = param_specs(s)
    cache_specs = tuple(CACHE_SPEC for _ in ks)
    row = P(DATA, None, None)
    fn = jax.shard_map(
        functools.partial(_local_forward, s, with_features), mesh=s.mesh,
        in_specs=(specs, cache_specs, cache_specs, P(DATA, None), P(), P(DATA)),
        out_specs=(row, row, cache_specs, cache_specs), check_vma=False)
    hidden, features, ks, vs = fn(params, ks, vs, tokens, jnp.asarray(slot, jnp.int32), first)
    return hidden, features, (ks, vs)


def new_row_cache(s: TargetShape, rows: int, size: int):
    """Zero (K, V) caches for `forward_rows` in the compute dtype, placed on the mesh: per layer
    K [rows, kv, hd, size], V [rows, kv, size, hd]."""
    sharding = NamedSharding(s.mesh, CACHE_SPEC)
    z = lambda shape: jax.lax.with_sharding_constraint(jnp.zeros(shape, s.jnp_dtype), sharding)
    k = tuple(z((rows, s.kv_heads, s.head_dim, size)) for _ in range(s.num_layers))
    v = tuple(z((rows, s.kv_heads, size, s.head_dim)) for _ in range(s.num_layers))
    return (k, v)


def new_cache(s: TargetShape, size: int):
    """The one-sequence cache of `forward` (a one-row `new_row_cache`)."""
    return new_row_cache(s, 1, size)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def forward(s: TargetShape, params, cache, tokens, start):
    """One sequence: tokens [n] at positions start..start+n-1 on top of `cache` (keys/values of
    positions < start) -> (final-normed hidden [n, H], features [n, K*H], new cache)."""
    hidden, feats, cache = forward_rows(s, params, cache, tokens[None], start,
                                        jnp.zeros((1,), jnp.int32), with_features=True)
    return hidden[0], feats[0], cache


def logits(params, hidden):
    """hidden [..., H] float32 -> logits [..., V] float32 (LM head in its stored dtype)."""
    head = params["lm_head"]
    return jax.lax.dot_general(hidden.astype(head.dtype), head,
                               (((hidden.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


logits_of = jax.jit(logits)


def bucket(n: int, step: int) -> int:
    """Round n up to a multiple of `step` so jit compiles once per bucket, not per length."""
    return max(step, -(-n // step) * step)


class CachedTarget:
    """Target adapter for pipeline.speculative.loop: prefill / extend with a rolling KV cache.
    One sequence, tensor-parallel over `devices` (default: every accelerator, one CPU device)."""

    def __init__(self, path, feature_layers, *, max_len: int = 4096, dtype: str = "auto",
                 devices=None):
        cfg = load_hf_config(path)
        mesh = decoder_mesh(list(devices or default_devices()), cfg)
        if dict(mesh.shape)[DATA] > 1:  # one row: use only the model axis's devices
            mesh = decoder_mesh(list(mesh.devices[0]), cfg)
        self.shape, self.params, self.hf_config = load_target(path, feature_layers, dtype=dtype,
                                                              mesh=mesh)
        self.embedding = self.params["embed"]
        self.max_len = max_len
        self.cache = None

    def reset(self, capacity: int):
        self.cache = new_cache(self.shape, bucket(capacity, 256))

    def run(self, tokens: np.ndarray, start: int, n_valid: int, pad_to: int):
        """Feed tokens[:n_valid] at positions start..; returns (logits [n_valid, V], feats [n_valid, F])."""
        buf = np.zeros(pad_to, np.int32)
        buf[:n_valid] = tokens[:n_valid]
        if start + pad_to > self.cache[0][0].shape[-1]:
            raise UserError(f"sequence of {start + pad_to} tokens exceeds the cache "
                            f"({self.cache[0][0].shape[-1]})")
        hidden, feats, self.cache = forward(self.shape, self.params, self.cache, jnp.asarray(buf),
                                            jnp.int32(start))
        lg = np.asarray(logits_of(self.params, hidden))  # padded rows: one compile per bucket
        return lg[:n_valid], np.asarray(feats)[:n_valid]
