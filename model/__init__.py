"""DFlash draft model in JAX: config, forward (inference and training forms), checkpoints.

Pure JAX over a plain params pytree; no easydel or torch import (the GPU trainer cannot load them).
"""
from model.attention import block_sparse_attention
from model.config import DraftConfig, build_target_layer_ids
from model.draft import (block_tokens, draft_hidden, draft_hidden_train, draft_logits, embed_block,
                         init_draft_params, param_logical_axes, param_shapes)
from model.io import load_config, load_draft, load_msgpack, save_draft, save_msgpack

__all__ = [
    "DraftConfig", "block_sparse_attention", "block_tokens", "build_target_layer_ids",
    "draft_hidden", "draft_hidden_train", "draft_logits", "embed_block", "init_draft_params",
    "load_config", "load_draft", "load_msgpack", "param_logical_axes", "param_shapes",
    "save_draft", "save_msgpack",
]
