"""DFlash draft model in JAX: config, the `DFlashDraft` Linen module (every form), checkpoints.

No easydel or torch import (the GPU trainer cannot load them). `model.draft` holds the
functional API over list-form params that train/ and pipeline/ use; each function applies the
module.

Names are imported on first use (PEP 562), so `import model.errors` (which every layer uses for
UserError) does not pull in jax and flax: the feature cache, which train/ reads, stays free of
them.
"""
import importlib

_HOME = {
    "block_sparse_attention": "model.attention",
    "DraftConfig": "model.config", "build_target_layer_ids": "model.config",
    **{name: "model.draft" for name in (
        "as_variables", "block_tokens", "draft_hidden", "draft_hidden_train", "draft_logits",
        "embed_block", "from_variables", "init_draft_params", "param_counts",
        "param_logical_axes", "param_shapes")},
    **{name: "model.io" for name in (
        "load_config", "load_draft", "load_msgpack", "save_draft", "save_msgpack")},
    "DFlashDraft": "model.module", "empty_cache": "model.module",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
