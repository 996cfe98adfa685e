"""Rotary position embedding with the inverse frequencies of transformers' ROPE_INIT_FUNCTIONS.

Supported rope types: "default", "linear" and "yarn" (GPT-OSS: factor 32, original 4096,
beta_fast 32, beta_slow 1, truncate false). Frequencies are computed once on the host in float32,
step for step as transformers 5.5 does in torch, because a one-ulp difference in a frequency
becomes an angle error of position x ulp at long context (see `_base_frequencies`).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from model.config import DraftConfig

f32 = np.float32


def _base_frequencies(theta: float, dim: int) -> np.ndarray:
    """theta ** (arange(0, dim, 2) / dim): float32 exponents as torch makes them, the power taken
    in float64 and rounded once. torch's float32 pow (SLEEF, <= 1 ulp) is not correctly rounded
    and differs per device, so no choice reproduces every runtime; this one is within 1 ulp of
    torch CPU and is the nearest float32 to the exact value."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    return np.power(np.float64(theta), exponents.astype(np.float64)).astype(f32)


def _yarn(theta: float, dim: int, params: dict, max_positions: int) -> tuple[np.ndarray, float]:
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    factor = float(factor)

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    pos_freqs = _base_frequencies(theta, dim)
    extrapolation = (f32(1.0) / pos_freqs).astype(f32)
    interpolation = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
    keep = (f32(1.0) - ramp).astype(f32)  # transformers' inv_freq_extrapolation_factor
    inv_freq = interpolation * (f32(1.0) - keep) + extrapolation * keep
    return inv_freq.astype(f32), float(attention_factor)


def inv_freq_from_params(params: dict, theta: float, head_dim: int,
                         max_positions: int) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling) from an HF rope dict
    (`rope_scaling` / `rope_parameters`: rope_type, factor, YaRN's betas, truncate, ...).
    The one RoPE definition of the project: the draft, the cached target of the harness and the
    EasyDeL teacher's fixed table all take their frequencies from here."""
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (GPT-OSS rotates every dim)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "yarn":
        return _yarn(theta, head_dim, params, max_positions)
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, yarn)")
    inv_freq = (f32(1.0) / _base_frequencies(theta, head_dim)).astype(f32)
    if rope_type == "linear":
        inv_freq = (inv_freq / f32(params["factor"])).astype(f32)
    return inv_freq, 1.0


def rope_frequencies(config: DraftConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling) for the config's rope type."""
    return inv_freq_from_params(config.rope_params, config.rope_theta, config.head_dim,
                                config.max_position_embeddings)


def hf_config_frequencies(hf_config) -> tuple[np.ndarray, float]:
    """(inv_freq, attention_scaling) of a transformers or EasyDeL model config object: its
    `rope_parameters` (transformers >= 5), else the legacy `rope_scaling` + `rope_theta`."""
    rope = dict(getattr(hf_config, "rope_parameters", None)
                or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)
    return inv_freq_from_params(rope, theta, int(head_dim), hf_config.max_position_embeddings)


def cos_sin(inv_freq, scaling: float, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [..., head_dim] for integer positions [...] (attention scaling applied)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def rope_cos_sin(config: DraftConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [..., head_dim] for integer positions [...] (attention scaling applied)."""
    inv_freq, scaling = rope_frequencies(config)
    return cos_sin(inv_freq, scaling, positions)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [..., S, heads, D] by cos/sin [..., S, D] (HF rotate_half convention)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
