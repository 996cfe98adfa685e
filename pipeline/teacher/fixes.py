"""Named corrections to EasyDeL 0.3.0's GPT-OSS, so its forward matches HF torch `GptOssForCausalLM`.

Each defect below was read in the installed EasyDeL source and measured against HF torch
(tests/test_teacher_fixes.py: error without the fix > error with it). Every fix is one small
function, applied per model instance (nothing global is patched), and switchable by name, so
one can be dropped the day EasyDeL is fixed:

- `fp32_load`: `from_torch=True` loads the torch checkpoint with `torch_dtype=float16` unless told
  otherwise (infra/mixins/bridge.py `_load_full_torch_checkpoint`), rounding every weight to fp16
  before casting it to the requested dtype. Fix: load in float32, or bfloat16 for a bfloat16 model
  (exact for the bf16 checkpoints GPT-OSS ships, and half the host memory).
- `moe_routing`: `GptOssMLP` never sets `self.dtype`, so `BaseMoeModule` computes the experts in
  bfloat16 whatever the model dtype; and its hooks apply softmax three times (top-k softmax
  scattered into zeros, a softmax over all experts of that, a softmax of the selected weights).
  HF: top-k of the router logits, then one softmax over the k selected logits. Fix: the model's
  dtype, raw logits into top-k, one softmax over the selected ones.
- `sliding_window`: EasyDeL's sliding mask keeps keys k with q - W <= k <= q (W + 1 keys); HF keeps
  q - W < k <= q (W keys). Fix: give EasyDeL's attention W - 1.
- `rope_table`: the RoPE cos/sin table is cast to bfloat16 (infra/base_config.py
  `get_basic_frequencies`) and YaRN always floors/ceils the correction range, ignoring
  `truncate: false` that GPT-OSS sets. Fix: a float32 table built with HF's YaRN formula.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FIX_NAMES = ("fp32_load", "moe_routing", "sliding_window", "rope_table")
ALL_FIXES = frozenset(FIX_NAMES)


def check_fixes(fixes) -> frozenset:
    """Validate a collection of fix names (None = all) and return it as a frozenset."""
    fixes = ALL_FIXES if fixes is None else frozenset(fixes)
    unknown = sorted(fixes - ALL_FIXES)
    if unknown:
        raise ValueError(f"unknown EasyDeL fix(es) {unknown}; known: {list(FIX_NAMES)}")
    return fixes


def load_kwargs(dtype, fixes) -> dict:
    """Extra `from_pretrained` kwargs (fix `fp32_load`): the torch dtype to read the checkpoint in."""
    if "fp32_load" not in fixes:
        return {}
    import torch

    return {"torch_dtype": torch.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else torch.float32}


def apply_fixes(model, fixes, dtype) -> None:
    """Apply the model-side fixes (all but `fp32_load`) to a loaded EasyDeL GptOssForCausalLM."""
    for layer in model.model.layers:
        if "moe_routing" in fixes:
            fix_moe_routing(layer.mlp, dtype)
        if "sliding_window" in fixes:
            fix_sliding_window(layer.self_attn)
    if "rope_table" in fixes:
        fix_rope_table(model.model, model.config)


# --- moe_routing -----------------------------------------------------------------------------

def _keep_router_logits(logits):
    # Replaces EasyDeL's softmax over all experts: top-k must see the raw logits, as in HF.
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _softmax_selected(top_logits):
    # HF GptOssTopKRouter: softmax over the k selected logits, once.
    return jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1)


def fix_moe_routing(mlp, dtype) -> None:
    """Compute the experts in the model dtype and route like HF (one softmax over the top-k)."""
    mlp.dtype = jnp.dtype(dtype)
    mlp.moe_hooks = mlp.moe_hooks.replace(
        after_gate=None, normalize_gate_logits=_keep_router_logits,
        refine_weights_hook=_softmax_selected)


# --- sliding_window --------------------------------------------------------------------------

def fix_sliding_window(attn) -> None:
    """Make a sliding layer attend to W keys (itself and W - 1 before it), as HF does."""
    window = getattr(attn, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        attn.sliding_window = window - 1


# --- rope_table ------------------------------------------------------------------------------

def hf_rope_inv_freq(rope: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) by HF's formulas ("default" and "yarn").

    Mirrors transformers.modeling_rope_utils `_compute_yarn_parameters`, float32 like its torch
    code, including `truncate` (default True) and the mscale rule for the attention factor.
    """
    base = float(rope["rope_theta"])
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_table fix supports rope_type default/yarn, not {rope_type!r}")
    factor = float(rope["factor"])
    original = float(rope["original_max_position_embeddings"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrapolation = np.float32(1) - ramp
    inv_freq = (np.float32(1) / (np.float32(factor) * pos_freqs)) * (np.float32(1) - extrapolation) \
        + (np.float32(1) / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def rope_table(rope: dict, head_dim: int, max_positions: int) -> np.ndarray:
    """float32 [max_positions, rotary_dim]: [cos | sin] * attention scaling, EasyDeL's table layout."""
    inv_freq, scaling = hf_rope_inv_freq(rope, head_dim)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(freqs) * np.float32(scaling),
                           np.sin(freqs) * np.float32(scaling)], axis=-1).astype(np.float32)


def _rope_dict(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def fix_rope_table(base_model, config) -> None:
    """Replace the bf16 RoPE table of the base model by an exact float32 one (replicated)."""
    from easydel.infra.utils import ModuleCaches
    from jax.sharding import NamedSharding, PartitionSpec

    table = rope_table(_rope_dict(config), config.head_dim, config.max_position_embeddings)
    # An instance attribute shadows EasyDeL's cached_property `frequencies`; as an nnx Cache it
    # travels in the split state, so the jitted forward receives it as an input, not a constant.
    base_model.frequencies = ModuleCaches(
        jax.device_put(table, NamedSharding(config.mesh, PartitionSpec())))
