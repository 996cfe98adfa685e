"""The dump's teacher forward (pipeline.teacher.easydel_teacher `_forward`, EasyDeL GPT-OSS with the fidelity
fixes) compiled for a TPU topology with abstract weights: no checkpoint is read, no parameter is
allocated.

EasyDeL's own torch loader builds the module with `lazy_init` (nnx.eval_shape: every Param a
ShapeDtypeStruct) before it streams the weights in; here the streaming is skipped. Its mesh is
set to one over the topology's devices (`config.set_model_mesh`), the params take the shardings
of EasyDeL's partition rules for that mesh (as `fully_shard` derives them), and the jitted forward
is lowered on the abstract state. The four fixes of pipeline/teacher/fixes.py are applied as the
dump applies them, except that `rope_table`'s float32 table is an abstract input of the same
shape (device_put onto a topology device is impossible; its values do not change the program).
"""
from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pipeline.teacher import fixes as easydel_fixes
from pipeline.teacher import jax_setup, sharding
from pipeline.errors import UserError


def build_abstract(hf_config: dict, mesh_devices, axis_dims, *, dtype=jnp.bfloat16,
                   attn_mechanism: str = "blocksparse"):
    """(graphdef, abstract sharded state, mesh) of EasyDeL's GptOssForCausalLM, no weights."""
    from pipeline.teacher.easydel_teacher import _import_easydel
    from easydel.infra.utils import ModuleCaches, sanitize_partition_spec_for_shape
    from easydel.modules.auto.auto_configuration import get_modules_by_type
    from easydel.infra.factory import TaskType
    from eformer.escale import match_partition_rules
    from flax import nnx

    _import_easydel()
    dims = jax_setup.check_axis_dims(axis_dims, len(mesh_devices), "tpu")
    config_class, module = get_modules_by_type("gpt_oss", task_type=TaskType.CAUSAL_LM)
    with tempfile.TemporaryDirectory() as tmp:  # EasyDeL reads configs from a snapshot dir
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        ed_config = config_class.from_pretrained(tmp)
    if hasattr(ed_config, "attach_custom_arguments"):
        ed_config.attach_custom_arguments()
    ed_config.add_basic_configurations(
        sharding_axis_dims=dims, attn_mechanism=attn_mechanism, attn_dtype=dtype,
        attn_softmax_dtype=jnp.float32)
    # EasyDeL's own mesh would span jax.devices() (the CPU here): build it over the topology.
    resolved = sharding.resolve_axis_dims(dims, len(mesh_devices))
    arr = mesh_utils.create_device_mesh(resolved, devices=mesh_devices)
    mesh = Mesh(arr, jax_setup.AXIS_NAMES)
    ed_config.set_model_mesh(mesh)
    model = module.lazy_init(config=ed_config, dtype=dtype, param_dtype=dtype,
                             precision=None, rngs=nnx.Rngs(0))
    for layer in model.model.layers:
        easydel_fixes.fix_moe_routing(layer.mlp, dtype)
        easydel_fixes.fix_sliding_window(layer.self_attn)
    cfg = model.config
    rope = easydel_fixes._rope_dict(cfg)
    rot = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
    model.model.frequencies = ModuleCaches(jax.ShapeDtypeStruct(
        (cfg.max_position_embeddings, rot), jnp.float32))
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    specs = match_partition_rules(sharding.module_rules(model), abstract)
    sharded = jax.tree.map(
        lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, sanitize_partition_spec_for_shape(spec=spec, shape=tuple(x.shape), mesh=mesh)
            if isinstance(spec, P) else P())),
        specs, abstract)
    return graphdef, sharded, mesh


def compile_forward(hf_config: dict, devices, axis_dims, *, batch: int, seq_len: int,
                    layer_ids, dtype=jnp.bfloat16, attention: str = "blocksparse"):
    """(compiled, seconds, mesh) of the dump's jitted features forward at [batch, seq_len]
    (seq_len as the teacher runs it: attention.run_length); train.aot.DoesNotFit (with its
    .seconds and .mesh) when XLA:TPU finds it exceeds HBM."""
    from pipeline.teacher.easydel_teacher import _forward
    from train.aot import DoesNotFit, compile_lowered, target_backend

    graphdef, state, mesh = build_abstract(hf_config, devices, axis_dims, dtype=dtype,
                                           attn_mechanism=attention)
    sharding.check_batch(batch, mesh)
    rep = NamedSharding(mesh, P())
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rep)
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=rep)
    fn = jax.jit(functools.partial(_forward, graphdef), static_argnames=("layer_ids", "logits_at"))
    t0 = time.perf_counter()
    with mesh, target_backend("tpu"):
        try:
            compiled = compile_lowered(fn.lower(state, ids, mask, layer_ids=tuple(layer_ids),
                                                logits_at=None))
        except DoesNotFit as e:
            e.seconds, e.mesh = time.perf_counter() - t0, mesh
            raise
    return compiled, time.perf_counter() - t0, mesh
