"""RoPE tables with exactly HF's semantics (default, YaRN incl. `truncate`), for the cached decoders.

The inverse frequencies and the attention scaling come from transformers' own
`ROPE_INIT_FUNCTIONS`, so YaRN details (truncate, mscale, beta_fast/slow) cannot drift from the
model users serve; only the cheap cos/sin product is done here, in float32 as HF does.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_params(hf_config) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float32, attention_scaling) for a transformers config object."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config.standardize_rope_params()
    params = hf_config.rope_parameters or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // hf_config.num_attention_heads)
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        return inv.astype(np.float32), 1.0
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv.float().numpy(), float(scale)


def cos_sin(inv_freq: jnp.ndarray, scaling: float, positions: jnp.ndarray):
    """positions [n] int -> (cos, sin) [n, head_dim/2] float32 (HF computes these in float32)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs) * scaling, jnp.sin(freqs) * scaling


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [n, heads, head_dim]; non-interleaved halves (HF rotate_half / GPT-OSS chunk form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
