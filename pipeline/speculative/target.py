"""GPT-OSS target with a KV cache, in pure JAX, for speculative decoding.

Why our own forward: EasyDeL 0.3.0's cache path does not go through the fixes of
`pipeline.teacher.fixes` (sliding window width, MoE softmax, RoPE truncate), and a verify step
needs "B new tokens on top of a cache, then roll back the rejected ones". Here the cache is a
fixed [L, S, kv, hd] buffer per K and V: a step writes positions start..start+n-1, and a query at
position p only reads keys <= p, so entries of rejected tokens are never read and rolling back
is free (they are overwritten by the next step). `--naive` (the EasyDeL Teacher recomputing
everything) is the oracle this module is tested against, token for token.

Semantics follow HF `GptOssForCausalLM`: attention sinks, sliding layers see keys with
q - k < window, top-k router with softmax over the selected logits, clamped GLU experts.
Weights are read straight from the snapshot's safetensors (HF names). Experts are computed
densely (every expert for every token, then weighted): right for the tiny teacher and short
blocks; a real 20B run wants a gathered/ragged MoE instead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model import rope
from model.safetensors_io import read_safetensors
from pipeline.errors import UserError
from pipeline.teacher.snapshot_check import check_snapshot


@dataclass(frozen=True)
class TargetShape:
    """Static shape facts of a GPT-OSS config (hashable: closed over by jit)."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    sliding_window: int
    layer_sliding: tuple  # per layer: True for sliding_attention
    top_k: int
    feature_layers: tuple  # layer ids whose outputs are the draft's features


def load_hf_config(path):
    """The snapshot's HF config; a missing, non-JSON or unknown config.json is a UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}/config.json: not a usable model config ({msg})") from None


def load_target(path, feature_layers) -> tuple[TargetShape, dict, object]:
    """(shape, params, hf_config) from a GPT-OSS HF snapshot directory."""
    path = Path(path)
    cfg = load_hf_config(path)
    if getattr(cfg, "model_type", None) != "gpt_oss":
        raise UserError(f"{path}: cached target supports gpt_oss, got {cfg.model_type!r}")
    bad = [i for i in feature_layers if not 0 <= int(i) < cfg.num_hidden_layers]
    if bad:
        raise UserError(f"feature layers {bad} outside the teacher's {cfg.num_hidden_layers} layers")
    check_snapshot(path, cfg.to_dict(), jnp.float32, jax.devices())  # before any allocation
    w = {k: jnp.asarray(v, jnp.float32) for k, v in read_safetensors(path).items()}
    if any(k.endswith("_blocks") for k in w):
        raise UserError(f"{path}: MXFP4-quantized experts are not supported by the cached target; "
                        "use a dequantized snapshot (or tools.spec_decode --naive)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = TargetShape(
        num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=head_dim, eps=cfg.rms_norm_eps,
        sliding_window=int(cfg.sliding_window or 0),
        layer_sliding=tuple(t == "sliding_attention" for t in cfg.layer_types),
        top_k=cfg.num_experts_per_tok, feature_layers=tuple(int(i) for i in feature_layers))
    inv, scale = rope.hf_config_frequencies(cfg)
    p = {"embed": w["model.embed_tokens.weight"], "norm": w["model.norm.weight"],
         "lm_head": w.get("lm_head.weight", w["model.embed_tokens.weight"]),
         "inv_freq": jnp.asarray(inv), "rope_scale": jnp.float32(scale), "layers": []}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        a = pre + "self_attn."
        m = pre + "mlp."
        lay = {name: w[a + name + ".weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        lay.update({name + "_b": w.get(a + name + ".bias") for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        lay.update(sinks=w[a + "sinks"], ln1=w[pre + "input_layernorm.weight"],
                   ln2=w[pre + "post_attention_layernorm.weight"],
                   router=w[m + "router.weight"], router_b=w[m + "router.bias"],
                   gate_up=w[m + "experts.gate_up_proj"], gate_up_b=w[m + "experts.gate_up_proj_bias"],
                   down=w[m + "experts.down_proj"], down_b=w[m + "experts.down_proj_bias"])
        p["layers"].append(lay)
    return shape, p, cfg


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps))


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _moe(s: TargetShape, lay, x):
    """x [n, H] -> [n, H]; HF GptOssMLP semantics, experts computed densely."""
    logits = x @ lay["router"].T + lay["router_b"]
    top_v, top_i = jax.lax.top_k(logits, s.top_k)
    top_w = jax.nn.softmax(top_v, axis=-1)
    weights = jnp.zeros_like(logits).at[jnp.arange(x.shape[0])[:, None], top_i].set(top_w)
    gate_up = jnp.einsum("nh,ehf->nef", x, lay["gate_up"]) + lay["gate_up_b"]
    gate = jnp.minimum(gate_up[..., ::2], 7.0)
    up = jnp.clip(gate_up[..., 1::2], -7.0, 7.0)
    act = (up + 1.0) * (gate * jax.nn.sigmoid(gate * 1.702))
    out = jnp.einsum("nef,efh->neh", act, lay["down"]) + lay["down_b"]
    return jnp.einsum("neh,ne->nh", out, weights)


def _attention(s: TargetShape, lay, x, cos, sin, k_cache, v_cache, start, sliding):
    """x [n, H] at positions start..start+n-1; caches [S, kv, hd] -> (out [n, H], k, v caches)."""
    n = x.shape[0]
    q = _linear(x, lay["q_proj"], lay["q_proj_b"]).reshape(n, s.heads, s.head_dim)
    k = _linear(x, lay["k_proj"], lay["k_proj_b"]).reshape(n, s.kv_heads, s.head_dim)
    v = _linear(x, lay["v_proj"], lay["v_proj_b"]).reshape(n, s.kv_heads, s.head_dim)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k, (start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v, (start, 0, 0))
    groups = s.heads // s.kv_heads
    qg = q.reshape(n, s.kv_heads, groups, s.head_dim)
    scores = jnp.einsum("nkgd,skd->kgns", qg, k_cache) * (s.head_dim ** -0.5)
    q_pos = start + jnp.arange(n)[:, None]
    k_pos = jnp.arange(k_cache.shape[0])[None, :]
    visible = k_pos <= q_pos
    if sliding:
        visible &= (q_pos - k_pos) < s.sliding_window
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
    sink = lay["sinks"].reshape(s.kv_heads, groups, 1, 1)
    top = jnp.maximum(jnp.max(scores, -1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    probs = e / (jnp.sum(e, -1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("kgns,skd->nkgd", probs, v_cache).reshape(n, s.heads * s.head_dim)
    return _linear(out, lay["o_proj"], lay["o_proj_b"]), k_cache, v_cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def forward(s: TargetShape, params, cache, tokens, start):
    """tokens [n] at positions start..start+n-1 on top of `cache` (keys/values of positions < start).

    Returns (final-normed hidden [n, H], features [n, K*H], new cache). cache = (K, V), each
    [L, S, kv, hd]; S must be >= start + n (dynamic_update_slice would clamp otherwise).
    """
    ks, vs = cache
    x = params["embed"][tokens]
    cos, sin = rope.cos_sin(params["inv_freq"], params["rope_scale"], start + jnp.arange(tokens.shape[0]))
    feats, new_k, new_v = [], [], []
    for i, lay in enumerate(params["layers"]):
        h, kc, vc = _attention(s, lay, rms_norm(x, lay["ln1"], s.eps), cos, sin, ks[i], vs[i], start,
                               s.layer_sliding[i])
        x = x + h
        x = x + _moe(s, lay, rms_norm(x, lay["ln2"], s.eps))
        new_k.append(kc)
        new_v.append(vc)
        feats.append(x)
    features = jnp.concatenate([feats[i] for i in s.feature_layers], axis=-1)
    return rms_norm(x, params["norm"], s.eps), features, (jnp.stack(new_k), jnp.stack(new_v))


def _attention_rows(s: TargetShape, lay, x, cos, sin, k_cache, v_cache, slot, first, sliding):
    """x [b, n, H] written at the shared cache slots slot..slot+n-1; row r's tokens sit at
    positions slot - first[r] ..., and its keys at slots < first[r] are padding, never read.
    k_cache [b, kv, hd, S], v_cache [b, kv, S, hd].

    The batched twin of `_attention`. Every row writes the same slots, so the new keys/values go
    in with one dynamic_update_slice per cache, which XLA does in place inside generate's while
    loop (a scatter at per-row positions cost ~1 ms per cache and step at batch 64, half the
    decode step). A query at slot q of row r sees keys at first[r] <= k <= q (and q - k < window
    on sliding layers): the same keys at the same relative positions as the row alone. The
    layouts are the ones XLA's batched dots take as they are (batch dims, then contraction last
    for K^T / first for V): with [b, S, kv, hd] the CPU compile transposed both caches of every
    layer at every step."""
    b, n, _ = x.shape
    flat = x.reshape(b * n, -1)
    q = _linear(flat, lay["q_proj"], lay["q_proj_b"]).reshape(b * n, s.heads, s.head_dim)
    k = _linear(flat, lay["k_proj"], lay["k_proj_b"]).reshape(b * n, s.kv_heads, s.head_dim)
    v = _linear(flat, lay["v_proj"], lay["v_proj_b"]).reshape(b, n, s.kv_heads, s.head_dim)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin).reshape(v.shape)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1), (0, 0, 0, slot))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3), (0, 0, slot, 0))
    groups = s.heads // s.kv_heads
    # Queries as [b, kv, groups*n, hd]: the dots then have exactly two batch dims and one free dim
    # per side. With n as its own dim between them ("bnkgd,bkds->bkgns") XLA's CPU dot ran ~6x
    # slower at decode (n=1, batch 64: 1.3 vs 0.2 ms per layer and dot).
    qg = q.reshape(b, n, s.kv_heads, groups, s.head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(b, s.kv_heads, groups * n, s.head_dim)
    scores = jnp.einsum("bkqd,bkds->bkqs", qg, k_cache) * (s.head_dim ** -0.5)
    scores = scores.reshape(b, s.kv_heads, groups, n, -1)
    q_slot = (slot + jnp.arange(n))[None, :, None]  # [1, n, 1]
    k_slot = jnp.arange(k_cache.shape[-1])[None, None, :]
    visible = (k_slot <= q_slot) & (k_slot >= first[:, None, None])  # [b, n, S]
    if sliding:
        visible &= (q_slot - k_slot) < s.sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    sink = lay["sinks"].reshape(1, s.kv_heads, groups, 1, 1)
    top = jnp.maximum(jnp.max(scores, -1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    probs = e / (jnp.sum(e, -1, keepdims=True) + jnp.exp(sink - top))
    probs = probs.reshape(b, s.kv_heads, groups * n, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache).reshape(b, s.kv_heads, groups, n, s.head_dim)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b * n, s.heads * s.head_dim)
    return _linear(out, lay["o_proj"], lay["o_proj_b"]).reshape(b, n, -1), k_cache, v_cache


def forward_rows(s: TargetShape, params, cache, tokens, slot, first):
    """tokens [b, n] written at the shared cache slots slot..slot+n-1; row r's sequence starts at
    slot first[r] (its token at slot j has position j - first[r]; slots before first[r] hold left
    padding and are never read) -> (final-normed hidden [b, n, H], new cache). cache = (K, V),
    tuples of L arrays [b, kv, hd, S] / [b, kv, S, hd] (per layer, so no step restacks them;
    `new_row_cache`); S must be >= slot + n (dynamic_update_slice would clamp otherwise).

    Same math as `forward` row by row (batched regeneration, pipeline.speculative.generate); not
    jitted on its own: it is traced into the caller's program."""
    ks, vs = cache
    b, n = tokens.shape
    x = params["embed"][tokens]
    positions = jnp.maximum(slot + jnp.arange(n)[None, :] - first[:, None], 0).reshape(-1)
    cos, sin = rope.cos_sin(params["inv_freq"], params["rope_scale"], positions)
    new_k, new_v = [], []
    for i, lay in enumerate(params["layers"]):
        h, kc, vc = _attention_rows(s, lay, rms_norm(x, lay["ln1"], s.eps), cos, sin, ks[i], vs[i],
                                    slot, first, s.layer_sliding[i])
        x = x + h
        x = x + _moe(s, lay, rms_norm(x, lay["ln2"], s.eps).reshape(b * n, -1)).reshape(b, n, -1)
        new_k.append(kc)
        new_v.append(vc)
    return rms_norm(x, params["norm"], s.eps), (tuple(new_k), tuple(new_v))


def new_row_cache(s: TargetShape, rows: int, size: int):
    """Zero (K, V) caches for `forward_rows`: per layer K [rows, kv, hd, size], V [rows, kv, size, hd]."""
    k = tuple(jnp.zeros((rows, s.kv_heads, s.head_dim, size), jnp.float32) for _ in range(s.num_layers))
    v = tuple(jnp.zeros((rows, s.kv_heads, size, s.head_dim), jnp.float32) for _ in range(s.num_layers))
    return (k, v)


@jax.jit
def logits_of(params, hidden):
    return hidden @ params["lm_head"].T


def new_cache(s: TargetShape, size: int):
    z = jnp.zeros((s.num_layers, size, s.kv_heads, s.head_dim), jnp.float32)
    return (z, jnp.zeros_like(z))


def bucket(n: int, step: int) -> int:
    """Round n up to a multiple of `step` so jit compiles once per bucket, not per length."""
    return max(step, -(-n // step) * step)


class CachedTarget:
    """Target adapter for pipeline.speculative.loop: prefill / extend with a rolling KV cache."""

    def __init__(self, path, feature_layers, *, max_len: int = 4096):
        self.shape, self.params, self.hf_config = load_target(path, feature_layers)
        self.embedding = self.params["embed"]
        self.max_len = max_len
        self.cache = None

    def reset(self, capacity: int):
        self.cache = new_cache(self.shape, bucket(capacity, 256))

    def run(self, tokens: np.ndarray, start: int, n_valid: int, pad_to: int):
        """Feed tokens[:n_valid] at positions start..; returns (logits [n_valid, V], feats [n_valid, F])."""
        buf = np.zeros(pad_to, np.int32)
        buf[:n_valid] = tokens[:n_valid]
        if start + pad_to > self.cache[0].shape[1]:
            raise UserError(f"sequence of {start + pad_to} tokens exceeds the cache ({self.cache[0].shape[1]})")
        hidden, feats, self.cache = forward(self.shape, self.params, self.cache, jnp.asarray(buf),
                                            jnp.int32(start))
        logits = np.asarray(logits_of(self.params, hidden))  # padded rows: one compile per bucket
        return logits[:n_valid], np.asarray(feats)[:n_valid]
