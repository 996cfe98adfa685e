"""How the GPT-OSS teacher is laid out on a mesh: the mesh shape and the parameter partition rules.

    dims = default_axis_dims(len(devices), devices[0].platform, num_experts)   # (1, 8, 1, 1, 1)
    rules = partition_rules(easydel_config)          # -> from_pretrained(partition_rules=rules)
    check_batch(batch_size, mesh)                    # the batch must split evenly

Used by the dump's teacher (pipeline.teacher.easydel_teacher), its TPU compile
(tools._tpu_teacher) and any other process that loads the same teacher (the online trainer).

Why not EasyDeL's defaults: GPT-OSS's config has no partition rules, so EasyDeL derives them
from each module's `craft_sharding`, and its MoE linears put the expert axis on `ep` alone. Its
fused MoE, though, runs expert-parallel over `ep` x `fsdp` (`fsdp_is_ep_bound`: the expert mesh
folds fsdp into ep) and slices each chip's experts inside its shard_map. So on the mesh
(1, N, 1, 1, 1) every chip STORES every expert (gpt-oss-20b: 33.67 GiB per v5e chip, refused)
only to use 1/N of them. `partition_rules` asks the same `craft_sharding` hooks for the
module view (`module_view=True`: the expert axis on (ep, sp, fsdp)), so each chip stores the
experts it computes; everything else keeps EasyDeL's spec. With fsdp carrying the batch
(EasyDeL's batch axis is (fsdp, dp)), attention and the dense layers are split over the chips,
none repeating another's rows, and the MoE runs each (token, expert) pair once, on the chip
holding the expert (gpt-oss-20b, v5e-8, batch 8: docs/TPU.md).

XLA:CPU has no ragged-all-to-all, which EasyDeL's fused expert-parallel MoE needs; on CPU an
fsdp mesh runs through `use_dense_experts` (EasyDeL's dense MoE path: the same expert weights,
sharded by the same rules, gathered per token by XLA) so the rules can be checked there.
"""
from __future__ import annotations

import math

from pipeline.errors import UserError

AXIS_NAMES = ("dp", "fsdp", "ep", "tp", "sp")  # EasyDeL's mesh axis order
BATCH_AXES = ("dp", "fsdp")  # EasyDeL's PartitionAxis.batch_axis: the axes that split rows


def default_axis_dims(num_devices: int, platform: str, num_experts: int) -> tuple[int, ...]:
    """The mesh (dp, fsdp, ep, tp, sp) for `num_devices` when none is given.

    Accelerators: fsdp over every device, when the experts divide evenly over them: the batch
    is split over every chip and, with `partition_rules`, so are the experts. Otherwise (and on
    CPU, where the fused expert-parallel MoE cannot run) tensor parallelism over every device,
    which any batch size fits.
    """
    if num_devices == 1:
        return (1, 1, 1, 1, 1)
    if platform != "cpu" and num_experts % num_devices == 0:
        return (1, num_devices, 1, 1, 1)
    return (1, 1, 1, num_devices, 1)


def resolve_axis_dims(dims, num_devices: int) -> tuple[int, ...]:
    """dims with a -1 replaced by what the devices leave for it."""
    known = math.prod(d for d in dims if d != -1)
    return tuple(int(num_devices // known if d == -1 else d) for d in dims)


def batch_shards(mesh) -> int:
    """How many ways the mesh splits the batch (dp x fsdp)."""
    shape = dict(mesh.shape)
    return int(math.prod(shape.get(a, 1) for a in BATCH_AXES))


def check_batch(batch_size: int, mesh) -> None:
    """One UserError line unless the batch splits evenly over the mesh's batch axes."""
    n = batch_shards(mesh)
    if batch_size % n:
        shape = dict(mesh.shape)
        raise UserError(f"batch size {batch_size} is not a multiple of {n}, the mesh's dp x fsdp "
                        f"(dp={shape.get('dp', 1)}, fsdp={shape.get('fsdp', 1)}): every chip "
                        "takes an equal share of the rows; change --batch-size or "
                        "--sharding-axis-dims")


def partition_rules(easydel_config, dtype=None) -> tuple:
    """EasyDeL's partition rules for this GPT-OSS config, the MoE experts sharded over the
    expert-parallel group (ep, sp, fsdp) instead of ep alone (module docstring). Pass them to
    `from_pretrained(partition_rules=...)` so weights are placed sharded as they load.

    The rules are regexes over parameter paths (layer numbers generalised), derived from a
    shape-only (`lazy_init`) model of the config: no weight is allocated."""
    import jax.numpy as jnp
    from easydel.infra.factory import TaskType
    from easydel.modules.auto.auto_configuration import get_modules_by_type
    from flax import nnx

    _, module = get_modules_by_type(easydel_config.model_type, task_type=TaskType.CAUSAL_LM)
    dtype = jnp.bfloat16 if dtype is None else dtype
    lazy = module.lazy_init(config=easydel_config, dtype=dtype, param_dtype=dtype,
                            precision=None, rngs=nnx.Rngs(0))
    return module_rules(lazy)


def module_rules(model) -> tuple:
    """`partition_rules` of an already built (or lazily built) EasyDeL model, normalised as
    EasyDeL normalises rules (a pattern also matches the `/value` leaf under a parameter path;
    without it an abstract nnx state tree matches only the catch-all: every weight replicated)."""
    return tuple(model._get_partition_rules(tuple(model.resolve_shardings_automatically(
        module_view=True))))


# --- CPU: the same rules through EasyDeL's dense MoE path -----------------------------------

def _log_probs(router_probs):
    # The dense path applies softmax to the router logits before any hook. Its log is the
    # logits less one per-token constant: the same top-k, and a softmax over the selected
    # entries equals HF's softmax over the selected logits (fixes.fix_moe_routing's hook).
    import jax.numpy as jnp

    return jnp.log(router_probs.astype(jnp.float32))


def use_dense_experts(model) -> None:
    """Run every MoE layer through EasyDeL's dense path (per-token gathered expert weights, no
    shard_map, no ragged-all-to-all), routed as HF routes. For CPU, where an fsdp/ep mesh
    cannot run the fused path; apply after pipeline.teacher.fixes (it keeps its hooks)."""
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.module_moe_method = "dense_moe"
        mlp.moe_hooks = mlp.moe_hooks.replace(before_topk=_log_probs)
