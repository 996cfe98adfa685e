"""DFlash draft with a context KV cache, in pure JAX, read straight from a z-lab export.

Why a cache is exact here: a draft layer's context K/V are functions of the context features
alone (fc -> hidden_norm -> k_proj/k_norm/RoPE, v_proj); the block's hidden states never flow
into them. So each committed position's K/V is projected once, appended to a fixed
[L, S, kv, hd] buffer (padded appends, masked by length), and every block attends to
[cache[:ctx_len] ; block]. The oracle is `model.draft_hidden` over the whole context
(`--naive`), and the reference `dflash.model.DFlashDraftModel` in the tests.

Masks follow the reference: full-attention layers see every context key and the whole block;
sliding layers are causal, with q - k < window.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.speculative import hf_rope as rope
from pipeline.errors import UserError
from pipeline.speculative.target import bucket, read_safetensors, rms_norm


@dataclass(frozen=True)
class DraftShape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    causal: tuple  # per layer
    window: tuple  # per layer: sliding window or 0
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple
    output_multiplier: float
    softcap: float
    input_embedding_scale: float = 1.0


def load_export(path) -> tuple[DraftShape, dict]:
    """(shape, params) from a z-lab export dir (config.json + *.safetensors)."""
    from transformers import Qwen3Config

    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: not a draft export (no config.json)")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json: not JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("dflash_config", {}), dict):
        raise UserError(f"{path}/config.json: expected a JSON object with a dflash_config object")
    dcfg = raw.get("dflash_config", {})
    try:
        cfg = Qwen3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "dflash_config")})
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}/config.json: not a usable draft config ({e})") from None

    def value(name, default=None):
        return dcfg.get(name, raw.get(name, default))

    n = cfg.num_hidden_layers
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    is_causal = raw.get("is_causal")
    causal = tuple((t == "sliding_attention") if is_causal is None else bool(is_causal) for t in types)
    window = tuple(int(cfg.sliding_window or 0) if t == "sliding_attention" else 0 for t in types)
    target_ids = value("target_layer_ids")
    if target_ids is None:
        raise UserError(f"{path}/config.json: no dflash_config.target_layer_ids")
    softcap = value("final_logit_softcapping")
    try:
        shape = _shape(n, cfg, causal, window, value, target_ids, softcap)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}/config.json: not a usable draft config ({e})") from None
    w = read_safetensors(path)
    # fc maps the K concatenated target features to the draft width: its shape is what the
    # weights were trained for, so a config.json edited to another width or K is caught here
    want = (shape.hidden, len(shape.target_layer_ids) * shape.hidden)
    got = tuple(w["fc.weight"].shape) if "fc.weight" in w else None
    if got != want:
        raise UserError(f"{path}: fc.weight is {got}, but config.json (hidden_size {shape.hidden}, "
                        f"{len(shape.target_layer_ids)} target layers) needs {want}")
    try:
        return shape, _params(w, cfg, n)
    except KeyError as e:
        raise UserError(f"{path}: weights lack {e} (config.json does not match them)") from None


def _shape(n, cfg, causal, window, value, target_ids, softcap) -> DraftShape:
    return DraftShape(
        num_layers=n, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        eps=cfg.rms_norm_eps, causal=causal, window=window,
        block_size=int(value("block_size", 16)), mask_token_id=int(value("mask_token_id")),
        target_layer_ids=tuple(int(i) for i in target_ids),
        output_multiplier=float(value("output_multiplier", 1.0) or 1.0),
        softcap=float(softcap) if softcap else 0.0,
        input_embedding_scale=float(value("input_embedding_scale", 1.0) or 1.0))


def _params(w, cfg, n) -> dict:
    inv, scale = rope.rope_params(cfg)
    p = {"fc": w["fc.weight"], "hidden_norm": w["hidden_norm.weight"], "norm": w["norm.weight"],
         "inv_freq": jnp.asarray(inv), "rope_scale": jnp.float32(scale), "layers": []}
    for i in range(n):
        pre = f"layers.{i}."
        a, m = pre + "self_attn.", pre + "mlp."
        lay = {k: w[a + k + ".weight"] for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        lay.update({k + "_b": w.get(a + k + ".bias") for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        lay.update(q_norm=w[a + "q_norm.weight"], k_norm=w[a + "k_norm.weight"],
                   ln1=w[pre + "input_layernorm.weight"], ln2=w[pre + "post_attention_layernorm.weight"],
                   gate=w[m + "gate_proj.weight"], up=w[m + "up_proj.weight"], down=w[m + "down_proj.weight"])
        p["layers"].append(lay)
    return p


def _lin(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _kv(s: DraftShape, lay, x, cos, sin):
    n = x.shape[0]
    k = rms_norm(_lin(x, lay["k_proj"], lay["k_proj_b"]).reshape(n, s.kv_heads, s.head_dim), lay["k_norm"], s.eps)
    v = _lin(x, lay["v_proj"], lay["v_proj_b"]).reshape(n, s.kv_heads, s.head_dim)
    return rope.apply_rope(k, cos, sin), v


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def append_context(s: DraftShape, params, cache, feats, start):
    """Project features [n, K*H] of positions start..start+n-1 into every layer's K/V cache."""
    ctx = rms_norm(feats @ params["fc"].T, params["hidden_norm"], s.eps)
    cos, sin = rope.cos_sin(params["inv_freq"], params["rope_scale"], start + jnp.arange(feats.shape[0]))
    ks, vs = cache
    new_k, new_v = [], []
    for i, lay in enumerate(params["layers"]):
        k, v = _kv(s, lay, ctx, cos, sin)
        new_k.append(jax.lax.dynamic_update_slice(ks[i], k, (start, 0, 0)))
        new_v.append(jax.lax.dynamic_update_slice(vs[i], v, (start, 0, 0)))
    return jnp.stack(new_k), jnp.stack(new_v)


@functools.partial(jax.jit, static_argnums=0)
def block_hidden(s: DraftShape, params, cache, emb, ctx_len, n_valid):
    """emb [B, H]: embedded [anchor, MASK...] at positions ctx_len..; only the first n_valid
    block rows exist (shorter tail blocks). Returns final-normed hidden [B, H]."""
    ks, vs = cache
    b = emb.shape[0]
    q_pos = ctx_len + jnp.arange(b)
    cos, sin = rope.cos_sin(params["inv_freq"], params["rope_scale"], q_pos)
    k_pos = jnp.concatenate([jnp.arange(ks.shape[1]), q_pos])
    exists = jnp.concatenate([jnp.arange(ks.shape[1]) < ctx_len, jnp.arange(b) < n_valid])
    groups = s.heads // s.kv_heads
    x = emb
    for i, lay in enumerate(params["layers"]):
        h = rms_norm(x, lay["ln1"], s.eps)
        q = rms_norm(_lin(h, lay["q_proj"], lay["q_proj_b"]).reshape(b, s.heads, s.head_dim), lay["q_norm"], s.eps)
        q = rope.apply_rope(q, cos, sin)
        kb, vb = _kv(s, lay, h, cos, sin)
        k = jnp.concatenate([ks[i], kb])
        v = jnp.concatenate([vs[i], vb])
        vis = jnp.broadcast_to(exists[None, :], (b, k.shape[0]))
        if s.causal[i]:
            vis &= k_pos[None, :] <= q_pos[:, None]
        if s.window[i]:
            vis &= (q_pos[:, None] - k_pos[None, :]) < s.window[i]
            if not s.causal[i]:
                vis &= (k_pos[None, :] - q_pos[:, None]) < s.window[i]
        sc = jnp.einsum("nkgd,skd->kgns", q.reshape(b, s.kv_heads, groups, s.head_dim), k) * s.head_dim ** -0.5
        pr = jax.nn.softmax(jnp.where(vis[None, None], sc, -jnp.inf), axis=-1)
        att = jnp.einsum("kgns,skd->nkgd", pr, v).reshape(b, s.heads * s.head_dim)
        x = x + _lin(att, lay["o_proj"], lay["o_proj_b"])
        h = rms_norm(x, lay["ln2"], s.eps)
        x = x + (jax.nn.silu(h @ lay["gate"].T) * (h @ lay["up"].T)) @ lay["down"].T
    return rms_norm(x, params["norm"], s.eps)


def head_logits(s: DraftShape, hidden, lm_head):
    """Draft logits through the target's frozen LM head, with the config's multiplier / softcap."""
    logits = (hidden @ lm_head.T) * s.output_multiplier
    if s.softcap > 0:
        logits = jnp.tanh(logits / s.softcap) * s.softcap
    return logits


@functools.partial(jax.jit, static_argnums=0)
def propose_logits(s: DraftShape, params, cache, embedding, lm_head, tokens, ctx_len, n_valid):
    """tokens [B] = [anchor, MASK...] -> draft logits [B, V] (row 0 is discarded by callers)."""
    emb = embedding[tokens] * s.input_embedding_scale
    return head_logits(s, block_hidden(s, params, cache, emb, ctx_len, n_valid), lm_head)


class CachedDraft:
    """Draft adapter for pipeline.speculative.loop: append committed features, propose a block."""

    def __init__(self, path, embedding, lm_head):
        self.shape, self.params = load_export(path)
        self.embedding, self.lm_head = jnp.asarray(embedding), jnp.asarray(lm_head)
        self.cache, self.ctx_len = None, 0

    def reset(self, capacity: int):
        z = jnp.zeros((self.shape.num_layers, bucket(capacity, 256), self.shape.kv_heads,
                       self.shape.head_dim), jnp.float32)
        self.cache, self.ctx_len = (z, jnp.zeros_like(z)), 0

    def extend(self, feats):
        """Append features [n, K*H] of the next n committed positions."""
        n = feats.shape[0]
        pad = bucket(n, 16) if n <= 16 else bucket(n, 64)  # steps: <= B rows; prefill: 64s
        if self.ctx_len + pad > self.cache[0].shape[1]:
            raise UserError("draft context exceeds its cache")
        buf = np.zeros((pad, feats.shape[1]), np.float32)
        buf[:n] = np.asarray(feats, np.float32)
        self.cache = append_context(self.shape, self.params, self.cache, jnp.asarray(buf), jnp.int32(self.ctx_len))
        self.ctx_len += n

    def logits(self, block_ids: np.ndarray, block_size: int) -> np.ndarray:
        """block_ids [n] = [anchor, MASK...] at positions ctx_len..; -> logits of slots 1..n-1."""
        n = len(block_ids)
        buf = np.full(block_size, self.shape.mask_token_id, np.int32)
        buf[:n] = block_ids
        logits = propose_logits(self.shape, self.params, self.cache, self.embedding, self.lm_head,
                                jnp.asarray(buf), jnp.int32(self.ctx_len), jnp.int32(n))
        return np.asarray(logits)[1:n]
