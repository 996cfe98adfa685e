"""The draft's functional API over the list-form params that train/, pipeline/ and io.py hold.

List form: the `DFlashDraft` params tree (see model.module) with `layers` a list, one dict per
draft layer. `as_variables` / `from_variables` convert it to and from the module's variables
({"params": ...} with layers keyed "0", "1", ...). Every function here is a thin wrapper that
applies the module; shapes, logical axes and initial values are read off the module too.
The target's embedding and LM head are not draft params: they are passed in, frozen.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import DraftConfig
from model.dflash2 import init_additions
from model.module import DFlashDraft

# ------------------------------------------------------------------ params


def as_variables(params: dict) -> dict:
    """List-form params -> the module's variables {"params": {..., "layers": {"0": ...}}}."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        layers = {str(i): p for i, p in enumerate(layers)}
    return {"params": {**params, "layers": layers}}


def from_variables(variables: dict) -> dict:
    """The module's variables (or their "params" collection) -> list-form params."""
    tree = dict(variables.get("params", variables))
    layers = tree["layers"]
    tree["layers"] = [layers[str(i)] for i in range(len(layers))]
    return tree


@functools.lru_cache(maxsize=None)
def _abstract_params(config: DraftConfig) -> dict:
    """List-form tree of the module's boxed abstract params (shapes + logical names), traced
    once per config by `DFlashDraft.init` under eval_shape (no FLOPs, no memory)."""
    k, h, b = config.num_features, config.hidden_size, config.block_size
    args = (jax.ShapeDtypeStruct((1, 1, k * h), jnp.float32),
            jax.ShapeDtypeStruct((1, b, h), jnp.float32),
            jax.ShapeDtypeStruct((1, 1 + b), jnp.int32))
    variables = jax.eval_shape(functools.partial(DFlashDraft(config).init, jax.random.key(0),
                                                 method="init_all"), *args)
    return from_variables(variables)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def param_logical_axes(config: DraftConfig) -> dict:
    """Same structure as the params; each leaf a PartitionSpec of logical axis names, one per dim.

    Names: embed, heads, kv, mlp (None = replicated), as the module declares them with
    nn.with_logical_partitioning; the trainer maps them to mesh axes with its rules table. A
    PartitionSpec, unlike a tuple, is a pytree leaf, so jax.tree.map(f, params, axes) pairs each
    param with its names."""
    return nn.get_partition_spec(_abstract_params(config))


def param_shapes(config: DraftConfig) -> dict:
    """Same structure as the params; each leaf the param's shape tuple."""
    return jax.tree.map(lambda box: tuple(box.value.shape), _abstract_params(config),
                        is_leaf=_is_box)


def param_counts(config: DraftConfig) -> dict[str, int]:
    """Trainable parameters by part: total, convolutions (DFlash2's attention_conv / mlp_conv),
    selector (DFlash2's codebooks 2 x V x rank + hidden projection) and the DFlash backbone."""
    counts = {"convolutions": 0, "selector": 0, "backbone": 0}
    leaves = jax.tree_util.tree_flatten_with_path(param_shapes(config),
                                                  is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, shape in leaves:
        keys = {str(getattr(k, "key", "")) for k in path}
        part = ("selector" if "candidate_selector" in keys else
                "convolutions" if keys & {"attention_conv", "mlp_conv"} else "backbone")
        counts[part] += math.prod(shape)
    return {"total": sum(counts.values()), **counts}


@functools.partial(jax.jit, static_argnums=0, static_argnames="dtype")
def init_draft_params(config: DraftConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Reference initialisation: kernels ~ N(0, 0.02), biases 0, norm scales 1 (list form).

    Jitted; inside a caller's jit it inlines, so the trainer can jit it with out_shardings to
    create the params already sharded. All kernels come from ONE normal draw, sliced, in the
    order of the params' leaves: on CPU each threefry op costs ~1 s of compile, which made a
    per-leaf init (what DFlashDraft.init does) slower than the forward pass (the price is a
    transient float32 copy of the kernels).

    DFlash2: the backbone is exactly the DFlash draft's of the same rng (so step 0 of a DFlash2
    run is that DFlash draft: its convolutions start as the identity), plus the additions of
    `model.dflash2.init_additions`."""
    if config.dflash2 is not None:
        backbone = init_draft_params(dataclasses.replace(config, dflash2=None), rng, dtype=dtype)
        return init_additions(config, jax.random.fold_in(rng, 2), backbone, dtype)
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config),
                                                          is_leaf=lambda x: isinstance(x, tuple))
    sizes = [math.prod(shape) if path[-1].key == "kernel" else 0 for path, shape in paths]
    draw = 0.02 * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    leaves, offset = [], 0
    for size, (path, shape) in zip(sizes, paths):
        kind = path[-1].key
        if kind == "kernel":
            leaves.append(draw[offset:offset + size].reshape(shape))
            offset += size
        else:
            leaves.append(jnp.full(shape, 0.0 if kind == "bias" else 1.0, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, [x.astype(dtype) for x in leaves])


# ------------------------------------------------------------------ forms


def _apply(config: DraftConfig, params: dict | None, *args, method: str, **kwargs):
    variables = {} if params is None else as_variables(params)
    return DFlashDraft(config).apply(variables, *args, method=method, **kwargs)


def draft_hidden(config: DraftConfig, params: dict, target_hidden: jnp.ndarray,
                 noise_embedding: jnp.ndarray, position_ids: jnp.ndarray) -> jnp.ndarray:
    """Inference form: target_hidden [b, ctx, K*H], noise_embedding [b, B, H], position_ids
    [b, ctx+B] -> final-normed hidden [b, B, H] (DFlashDraft.__call__)."""
    return _apply(config, params, target_hidden, noise_embedding, position_ids,
                  method="__call__")


def draft_hidden_train(config: DraftConfig, params: dict, target_hidden: jnp.ndarray,
                       block_embedding: jnp.ndarray, anchors: jnp.ndarray, *,
                       seq_positions: jnp.ndarray | None = None, implementation: str = "xla",
                       chunk_blocks: int | None = None, remat: bool = False) -> jnp.ndarray:
    """Training form: all blocks of a sequence, [b, N, B, H] (DFlashDraft.train_hidden)."""
    return _apply(config, params, target_hidden, block_embedding, anchors,
                  seq_positions=seq_positions, implementation=implementation,
                  chunk_blocks=chunk_blocks, remat=remat, method="train_hidden")


def embed_block(config: DraftConfig, embedding: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Embed block tokens with the target's frozen embedding [V, H] (DFlashDraft.embed)."""
    return _apply(config, None, embedding, tokens, method="embed")


def block_tokens(config: DraftConfig, input_ids: jnp.ndarray, anchors: jnp.ndarray) -> jnp.ndarray:
    """[anchor token, MASK x (B-1)] per block: input_ids [b, T], anchors [b, N] -> [b, N, B]."""
    return _apply(config, None, input_ids, anchors, method="block_tokens")


def draft_logits(config: DraftConfig, hidden: jnp.ndarray, lm_head: jnp.ndarray) -> jnp.ndarray:
    """hidden [..., H] -> logits through the frozen LM head [V, H] (DFlashDraft.logits)."""
    return _apply(config, None, hidden, lm_head, method="logits")
