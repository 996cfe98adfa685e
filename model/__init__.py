"""DFlash draft model in JAX: config, the `DFlashDraft` Linen module (every form), checkpoints.

No easydel or torch import (the GPU trainer cannot load them). `model.draft` holds the
functional API over list-form params that train/ and pipeline/ use; each function applies the
module.
"""
from model.attention import block_sparse_attention
from model.config import DraftConfig, build_target_layer_ids
from model.draft import (as_variables, block_tokens, draft_hidden, draft_hidden_train,
                         draft_logits, embed_block, from_variables, init_draft_params,
                         param_logical_axes, param_shapes)
from model.io import load_config, load_draft, load_msgpack, save_draft, save_msgpack
from model.module import DFlashDraft, empty_cache

__all__ = [
    "DFlashDraft", "DraftConfig", "as_variables", "block_sparse_attention", "block_tokens",
    "build_target_layer_ids", "draft_hidden", "draft_hidden_train", "draft_logits",
    "embed_block", "empty_cache", "from_variables", "init_draft_params", "load_config",
    "load_draft", "load_msgpack", "param_logical_axes", "param_shapes", "save_draft",
    "save_msgpack",
]
