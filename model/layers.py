"""Pure layers over plain param dicts: linear (Flax kernel [in, out]), RMSNorm, SwiGLU MLP."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(p: dict, x: jnp.ndarray) -> jnp.ndarray:
    """x [..., in] @ kernel [in, out] (+ bias [out] when present)."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def rms_norm(p: dict, x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Qwen3RMSNorm: normalise in float32, cast back to x's dtype, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return p["scale"].astype(x.dtype) * xf.astype(x.dtype)


def mlp(p: dict, x: jnp.ndarray) -> jnp.ndarray:
    """Qwen3MLP: down(silu(gate(x)) * up(x))."""
    return linear(p["down_proj"], jax.nn.silu(linear(p["gate_proj"], x)) * linear(p["up_proj"], x))
