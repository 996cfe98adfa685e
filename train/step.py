"""The train state, the optimizer, and the one pure train step, jitted once with explicit
shardings and the state donated.

    state  = {"params": f32 draft params, "opt_state": AdamW state, "step": int32, "rng": key}
    frozen = {"embed": [V, H], "lm_head": [V, H]}   (teacher tensors, compute dtype, never updated)
    batch  = {"input_ids" [b,T], "loss_mask" [b,T], "features" [b,T,K*H], "anchors" [b,N],
              "anchor_valid" [b,N], and from a cache with feature sums "feature_sums" [b,2]}

`frozen` is an argument, not a closure: jit would bake a closed-over [V, H] array into the
program as a constant (1.2 GB for gpt-oss), and it must not be donated or checkpointed.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import model
from pipeline.cache.feature_sums import feature_sums
from model.attention import resolve_implementation
from pipeline.errors import UserError
from train.anchors import block_labels
from train.config import TrainConfig
from train.loss import decay_weights, dflash_loss
from train.loss_dflash2 import dflash2_loss
from train.mesh import batch_sharding, replicated, shardings_for


# The selector's figures a DFlash2 step adds to its metrics (train/loss_dflash2.py).
DFLASH2_METRICS = ("unary_loss", "selector_loss", "cand_hit", "selector_correct",
                   "sel_slot_correct")


def lr_schedule(cfg: TrainConfig):
    """Linear warmup over warmup_frac of the steps, then cosine to 0 at the last step."""
    warmup = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip 1.0 then AdamW; weight decay only on matrices (not norms, biases, or DFlash2's
    convolution taps, whose neutral value is the identity, not 0)."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) != "base_kernel", params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask))


def init_state(cfg: TrainConfig, dcfg, rng) -> dict:
    """Fresh state (unsharded; `jit(init_state, out_shardings=...)` places it)."""
    init_rng, rng = jax.random.split(rng)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), model.init_draft_params(dcfg, init_rng))
    return {"params": params, "opt_state": make_optimizer(cfg).init(params),
            "step": jnp.zeros((), jnp.int32), "rng": rng}


def state_shardings(cfg: TrainConfig, dcfg, mesh, abstract_state) -> dict:
    """Params by the logical rules; each optimizer leaf shaped like a param takes that param's
    sharding (matched by tree-path suffix), scalars are replicated."""
    param_sh = shardings_for(model.param_logical_axes(dcfg), abstract_state["params"], mesh)
    by_path = {tuple(map(str, path)): sh for path, sh in
               jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def opt_leaf(path, x):
        keys = tuple(map(str, path))
        for n in range(len(keys)):
            sh = by_path.get(keys[n:])
            if sh is not None and x.ndim:
                return sh
        return replicated(mesh)

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated(mesh),
            "rng": replicated(mesh)}


def frozen_shardings(mesh, frozen_abstract) -> dict:
    """Embedding / head split over vocab only (tensor axis): their hidden dim stays whole, since
    the activations that meet it are split over batch, and FSDP-gathering the head for every
    vocab chunk of the CE would cost more than keeping it (1.2 GB bf16 for gpt-oss) per device."""
    axes = {"embed": ("vocab", None), "lm_head": ("vocab", None)}
    return shardings_for(axes, frozen_abstract, mesh)


def batch_shardings(mesh, feature_sums: bool = False) -> dict:
    """The step's batch keys and their shardings; with `feature_sums`, the [b, 2] uint32 sums
    the loader read beside each sequence's features, checked in the step."""
    out = {"input_ids": batch_sharding(mesh, 2), "loss_mask": batch_sharding(mesh, 2),
           "features": batch_sharding(mesh, 3), "anchors": batch_sharding(mesh, 2),
           "anchor_valid": batch_sharding(mesh, 2)}
    if feature_sums:
        out["feature_sums"] = batch_sharding(mesh, 2)
    return out


def attention_implementation(cfg: TrainConfig) -> str:
    """cfg.attention resolved for this backend and the compute dtype (UserError when it cannot
    run here, e.g. pallas_tpu on a CPU)."""
    try:
        return resolve_implementation(cfg.attention, jax.default_backend(), cfg.compute_dtype)
    except ValueError as e:
        raise UserError(f"--attention {cfg.attention}: {e}") from None


def make_step_fn(cfg: TrainConfig, dcfg):
    """The pure step (state, frozen, batch) -> (state, metrics); no jit here."""
    if dcfg.final_logit_softcapping is not None or dcfg.logits_scaling is not None:
        raise ValueError("chunked CE does not apply logit softcap/scaling (GPT-OSS drafts use none)")
    tx = make_optimizer(cfg)
    schedule = lr_schedule(cfg)
    weights = jnp.asarray(decay_weights(dcfg.block_size, cfg.decay_gamma))
    cdt = jnp.dtype(cfg.compute_dtype)
    attention = attention_implementation(cfg)

    def loss_fn(params, frozen, batch):
        p = jax.tree.map(lambda x: x.astype(cdt), params)
        blocks = model.block_tokens(dcfg, batch["input_ids"], batch["anchors"])
        block_emb = model.embed_block(dcfg, frozen["embed"], blocks)
        hidden = model.draft_hidden_train(dcfg, p, batch["features"].astype(cdt), block_emb,
                                          batch["anchors"], remat=cfg.remat,
                                          implementation=attention)
        labels, sup = block_labels(batch["input_ids"], batch["loss_mask"], batch["anchors"],
                                   batch["anchor_valid"], dcfg.block_size)
        if dcfg.dflash2 is not None:  # + alpha x selector CE (train/loss_dflash2.py)
            return dflash2_loss(dcfg, p, hidden, frozen["lm_head"], batch["input_ids"],
                                batch["anchors"], labels, sup, weights, alpha=cfg.selector_alpha,
                                vocab_chunk=cfg.vocab_chunk, token_chunk=cfg.token_chunk)
        return dflash_loss(hidden, frozen["lm_head"], labels, sup, weights,
                           vocab_chunk=cfg.vocab_chunk, token_chunk=cfg.token_chunk)

    def step_fn(state, frozen, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], frozen, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.fold_in(state["rng"], state["step"])}
        grad_norm = optax.tree.norm(grads)
        # a NaN learning rate gives finite loss and gradient but NaN params: check the update too
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "slot_correct": aux["slot_correct"],
                   "slot_count": aux["slot_count"], "finite": finite}
        metrics.update({k: aux[k] for k in DFLASH2_METRICS if k in aux})
        if "feature_sums" in batch:  # [b]: the bytes trained on are the bytes the dump wrote
            metrics["features_ok"] = jnp.all(
                feature_sums(batch["features"]) == batch["feature_sums"], axis=-1)
        return new_state, metrics

    return step_fn


def jit_step(cfg: TrainConfig, dcfg, mesh, state_sh, frozen_sh, feature_sums: bool = False):
    """The step jitted once: explicit in/out shardings, state donated; with `feature_sums` its
    batch carries them and its metrics say which rows match (`features_ok`). Logs the attention
    implementation it runs (on process 0)."""
    if jax.process_index() == 0:
        print(f"attention: {attention_implementation(cfg)} (--attention {cfg.attention}, "
              f"{jax.default_backend()}, {cfg.compute_dtype})", file=sys.stderr)
    step_fn = make_step_fn(cfg, dcfg)

    def traced(state, frozen, batch):  # the mesh in context: Pallas attention runs per shard
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, frozen, batch)

    return jax.jit(traced,
                   in_shardings=(state_sh, frozen_sh, batch_shardings(mesh, feature_sums)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())),
                   donate_argnums=(0,))
