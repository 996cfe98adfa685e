"""The teacher's default accelerator layout (pipeline.teacher.sharding) on 8 simulated devices:
mesh (1, 8, 1, 1, 1), experts stored sharded over fsdp by the partition rules, the batch split
over every device, blocksparse attention: its forward equals HF torch (and so the one-device
forward, which tests/test_teacher_fidelity.py holds to the same tolerance).

XLA:CPU has no ragged-all-to-all, the collective of EasyDeL's fused expert-parallel MoE (what a
TPU runs, compiled by tools.tpu_compile), so here the MoE runs EasyDeL's dense path
(sharding.use_dense_experts) over the same sharded expert weights and the same rules.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.teacher import jax_setup, sharding
from pipeline.teacher.easydel_teacher import Teacher
from tests._teacher_fixtures import HIDDEN, hf_outputs, tiny_model_dir

LAYERS = (0, 1, 2, 3)
TOL = 1e-4  # float32, as tests/test_teacher_fidelity.py
EXPERTS = 8


def _rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@functools.cache
def _sharded_teacher():
    return Teacher.from_pretrained(str(tiny_model_dir(EXPERTS)), dtype=jnp.float32,
                                   sharding_axis_dims=(1, 8, 1, 1, 1), attention="blocksparse",
                                   dense_experts=True, compilation_cache="off")


def test_default_axis_dims_and_batch_check():
    assert sharding.default_axis_dims(8, "tpu", 32) == (1, 8, 1, 1, 1)  # gpt-oss-20b, v5e-8
    assert sharding.default_axis_dims(4, "tpu", 128) == (1, 4, 1, 1, 1)  # gpt-oss-120b, v5p-8
    assert sharding.default_axis_dims(8, "cpu", 32) == (1, 1, 1, 8, 1)
    with pytest.raises(UserError, match="fsdp/ep > 1"):
        jax_setup.check_axis_dims((1, 8, 1, 1, 1), 8, "cpu")
    assert jax_setup.check_axis_dims((1, 8, 1, 1, 1), 8, "cpu", dense_experts=True)


@pytest.mark.slow
def test_expert_sharded_forward_matches_hf():
    t = _sharded_teacher()
    assert dict(t.mesh.shape) == {"dp": 1, "fsdp": 8, "ep": 1, "tp": 1, "sp": 1}
    assert sharding.batch_shards(t.mesh) == 8
    # Each device stores one of the 8 experts of every MoE weight (EasyDeL's own rules: all 8).
    experts = t._model.model.layers[0].mlp.experts
    for w in (experts.gate_proj.kernel, experts.up_proj.kernel, experts.down_proj.kernel,
              experts.gate_proj.bias):
        value = w[...]
        assert value.shape[0] == EXPERTS and "fsdp" in str(value.sharding.spec[0])
        assert {s.data.shape[0] for s in value.addressable_shards} == {1}
    ids = np.random.default_rng(3).integers(0, 128, size=(8, 512)).astype(np.int32)
    mask = np.ones_like(ids)
    logits, feats = t.forward(ids, mask, LAYERS, logits="all")
    # the batch is split over the 8 devices: one row each, none computed twice
    assert {s.data.shape[0] for s in feats.addressable_shards} == {1}
    ref = hf_outputs(tiny_model_dir(EXPERTS), ids, mask)
    errs = {f"layer{i}": _rel(np.asarray(feats)[..., k * HIDDEN:(k + 1) * HIDDEN],
                              ref["hidden_states"][i + 1]) for k, i in enumerate(LAYERS)}
    errs["logits"] = _rel(logits, ref["logits"])
    print("fsdp=8, experts sharded, blocksparse: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs
    with pytest.raises(UserError, match="not a multiple of 8"):
        t.features(ids[:4], mask[:4], [0])


def test_rules_shard_experts_where_easydel_replicates():
    """The rules differ from EasyDeL's own in the expert weights only."""
    from pipeline.teacher.easydel_teacher import _import_easydel

    ed = _import_easydel()
    cfg = ed.AutoEasyDeLConfig.from_pretrained(str(tiny_model_dir(EXPERTS)))
    cfg.add_basic_configurations(sharding_axis_dims=(1, 8, 1, 1, 1))
    ours = dict(sharding.partition_rules(cfg, jnp.float32))
    from easydel.infra.factory import TaskType
    from easydel.modules.auto.auto_configuration import get_modules_by_type
    from flax import nnx

    _, module = get_modules_by_type("gpt_oss", task_type=TaskType.CAUSAL_LM)
    lazy = module.lazy_init(config=cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                            precision=None, rngs=nnx.Rngs(0))
    theirs = dict(lazy._get_partition_rules(None))  # what EasyDeL uses for GPT-OSS
    assert ours.keys() == theirs.keys()
    changed = sorted(k for k in ours if ours[k] != theirs[k])
    assert changed and all("/experts/" in k for k in changed), changed
    for k in changed:
        assert "fsdp" in str(ours[k][0]) and "fsdp" not in str(theirs[k][0])
