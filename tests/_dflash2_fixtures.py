"""DFlash2 test helpers: configs (a tiny one, the tiny teacher's shapes, gpt-oss-20b's scaled
down) and params moved away from init, so that every addition changes the output (identity
convolutions or a negligible selector would make a parity test pass trivially)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import model
from model.config import DFlash2Config, DraftConfig
from pipeline.teacher.tiny_recipe import TinyTeacherConfig

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def tiny_dflash2(**overrides) -> DraftConfig:
    base = dict(dflash2=DFlash2Config(selector_rank=16, selector_top_k=8))
    base.update(overrides)
    return DraftConfig.tiny(**base)


def gpt_oss_scaled() -> DraftConfig:
    """gpt-oss-20b's draft with every width divided by 10 (hidden 2880 -> 288, 64/8 heads ->
    8/1 of head_dim 32, FFN 7680 -> 768), its RoPE (YaRN 32, theta 150000), bias, block 8,
    target layers [1, 6, 11, 16, 21] of 24, an odd vocabulary, the DFlash2 defaults but rank."""
    return DraftConfig(
        hidden_size=288, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32, vocab_size=2011, block_size=8, mask_token_id=2000,
        target_layer_ids=(1, 6, 11, 16, 21), num_target_layers=24, rms_norm_eps=1e-5,
        rope_theta=150000.0, rope_scaling=tuple(GPT_OSS_YARN.items()), attention_bias=True,
        max_position_embeddings=131072,
        dflash2=DFlash2Config(conv_kernel_size=2, conv_group_size=16, selector_rank=32,
                              selector_top_k=16))


def tiny_teacher_shaped() -> DraftConfig:
    """The DFlash2 draft train.main builds for the embedded tiny teacher (its recipe's shapes:
    hidden 128, 4/2 heads of 32, vocab 4096, YaRN 4 over 256, K = 5 of 8 layers)."""
    r = TinyTeacherConfig()
    hf = {"num_hidden_layers": r.num_hidden_layers, "hidden_size": r.hidden_size,
          "num_attention_heads": r.num_attention_heads,
          "num_key_value_heads": r.num_key_value_heads, "head_dim": r.head_dim,
          "vocab_size": r.vocab_size, "num_local_experts": r.num_local_experts,
          "attention_bias": True, "max_position_embeddings": 1024,
          "rope_parameters": {"rope_type": "yarn", "factor": r.yarn_factor, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "rope_theta": r.rope_theta,
                              "original_max_position_embeddings": r.yarn_original_max_position}}
    cfg = DraftConfig.from_target(hf, num_draft_layers=2, block_size=8,
                                  mask_token_id=r.vocab_size - 1, num_features=5)
    return dataclasses.replace(cfg, dflash2=DFlash2Config(selector_rank=32))


def moved_params(config: DraftConfig, seed: int = 0) -> dict:
    """Init params with every leaf moved: norms 1 +- 0.1, biases ~0.05, kernels ~N(0, 0.05),
    conv base taps ~identity +- 0.3 and projections ~N(0, 0.1), codebooks ~N(0, 1) (the
    bilinear term then reorders the unary top-K)."""
    params = model.init_draft_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        keys = [getattr(k, "key", None) for k in path]
        noise = rng.normal(size=x.shape).astype(np.float32)
        if "base_kernel" in keys:
            y = np.asarray(x) + 0.3 * noise
        elif "kernel_projection" in keys:
            y = 0.1 * noise
        elif keys[-1] in ("predecessor_codebook", "successor_codebook"):
            y = noise
        elif "hidden_projection" in keys:
            y = 0.3 * noise
        elif keys[-1] == "kernel":
            y = 0.05 * noise
        elif keys[-1] == "scale":
            y = 1.0 + 0.1 * noise
        else:
            y = 0.05 * noise
        out.append(jnp.asarray(y, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)
