"""Helpers for the model tests: build the reference `dflash.model.DFlashDraftModel` as a user would.

The reference's config is written here by hand (plain transformers Qwen3Config kwargs), not
through our DraftConfig, so that our reading of config.json is tested against it.
"""
from __future__ import annotations

import numpy as np
import torch
from dflash.model import DFlashDraftModel
from transformers import Qwen3Config

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def reference_config(*, hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2, num_features=5,
                     block_size=8, bias=False, rope_theta=10000.0, rope_scaling=None,
                     layer_types=None, sliding_window=None, vocab=300, extra_dflash=None,
                     **extra) -> Qwen3Config:
    """A small Qwen3Config carrying the DFlash keys (K = num_features target layers of 12)."""
    from dflash.model import build_target_layer_ids

    dflash = {"block_size": block_size, "mask_token_id": vocab - 1,
              "target_layer_ids": build_target_layer_ids(12, num_features)}
    dflash.update(extra_dflash or {})
    kwargs = dict(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  vocab_size=vocab, rms_norm_eps=1e-6, attention_bias=bias,
                  max_position_embeddings=131072, rope_theta=rope_theta,
                  rope_scaling=dict(rope_scaling) if rope_scaling else None,
                  architectures=["DFlashDraftModel"], num_target_layers=12, dflash_config=dflash)
    if layer_types is not None:
        kwargs.update(layer_types=list(layer_types), use_sliding_window=sliding_window is not None,
                      sliding_window=sliding_window)
    kwargs.update(extra)
    return Qwen3Config(**kwargs)


def reference_model(hf_config: Qwen3Config, seed: int = 0) -> DFlashDraftModel:
    """The reference draft with random (not initial) weights: norms near 1, biases non-zero."""
    torch.manual_seed(seed)
    model = DFlashDraftModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.08 * torch.randn_like(p))
    return model


def reference_forward(model: DFlashDraftModel, target_hidden: np.ndarray,
                      noise_embedding: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(position_ids=torch.from_numpy(np.asarray(position_ids, np.int64)),
                    noise_embedding=torch.from_numpy(np.asarray(noise_embedding, np.float32)),
                    target_hidden=torch.from_numpy(np.asarray(target_hidden, np.float32)))
    return out.numpy()


def reference_logits(model: DFlashDraftModel, hidden: np.ndarray,
                     lm_head: np.ndarray) -> np.ndarray:
    head = torch.nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(lm_head))
        return model.compute_logits(torch.from_numpy(np.asarray(hidden)), head).numpy()
