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
  `truncate: false` that GPT-OSS sets. Fix: a float32 table from model.rope (HF's YaRN formula).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.rope import hf_config_frequencies

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

def rope_table(config, max_positions: int | None = None) -> np.ndarray:
    """float32 [max_positions (default the config's), head_dim]: [cos | sin] * attention
    scaling, EasyDeL's table layout, with the frequencies of model.rope (the project's one RoPE
    definition, shared with the draft and the harness's cached target)."""
    inv_freq, scaling = hf_config_frequencies(config)
    n = config.max_position_embeddings if max_positions is None else max_positions
    freqs = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(freqs) * np.float32(scaling),
                           np.sin(freqs) * np.float32(scaling)], axis=-1).astype(np.float32)


def _rope_dict(config) -> dict:
    """The config's rope dict with its theta (tools/_tpu_teacher.py reads the rotary width)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def fix_rope_table(base_model, config) -> None:
    """Replace the bf16 RoPE table of the base model by an exact float32 one (replicated)."""
    from easydel.infra.utils import ModuleCaches
    from jax.sharding import NamedSharding, PartitionSpec

    table = rope_table(config)
    # An instance attribute shadows EasyDeL's cached_property `frequencies`; as an nnx Cache it
    # travels in the split state, so the jitted forward receives it as an input, not a constant.
    base_model.frequencies = ModuleCaches(
        jax.device_put(table, NamedSharding(config.mesh, PartitionSpec())))
