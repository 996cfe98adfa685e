"""Each EasyDeL fix, measured against HF torch: error without it (all others on) > error with all.

Model-side variants are nnx clones of one load, so each costs a compile, not a reload.
"""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.teacher import fixes as easydel_fixes
from pipeline.teacher.easydel_teacher import Teacher, load_easydel_model
from tests._teacher_fixtures import errors, f32_teacher, inputs, tiny_model_dir

LAYERS = (0, 1, 2, 3)
TOL = 1e-4
AXIS_DIMS = (1, 1, 1, 8, 1)
# Measured 2026-11-26 (float32, 8 devices, max relative error over layers and logits), without
# each fix, all others on: fp32_load 9.5e-4, moe_routing 0.37, sliding_window 0.49, rope_table
# 0.105; with all fixes 8.3e-7. The bound sits well under the smallest of them.
WITHOUT_FIX_MIN = 2e-4


@functools.cache
def _loaded(fp32_load: bool):
    return load_easydel_model(tiny_model_dir(), dtype=jnp.float32, sharding_axis_dims=AXIS_DIMS,
                              fixes={"fp32_load"} if fp32_load else set())


def _max_error(fixes) -> float:
    model = nnx.clone(_loaded("fp32_load" in fixes))
    easydel_fixes.apply_fixes(model, fixes, jnp.float32)
    t = Teacher(model, path=tiny_model_dir(), dtype=jnp.float32, fixes=fixes)
    logits, feats = t.forward(*inputs(), LAYERS, logits="all")
    errs = errors(feats, logits, LAYERS)
    print(f"fixes={sorted(fixes)}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    return max(errs.values())


@pytest.mark.slow
@pytest.mark.parametrize("fix", easydel_fixes.FIX_NAMES)
def test_each_fix_is_needed(fix):
    without = _max_error(easydel_fixes.ALL_FIXES - {fix})
    logits, feats = f32_teacher().forward(*inputs(), LAYERS, logits="all")
    with_all = max(errors(feats, logits, LAYERS).values())
    print(f"{fix}: without {without:.2e}, with all fixes {with_all:.2e}")
    assert with_all <= TOL
    assert without > WITHOUT_FIX_MIN > with_all


@pytest.mark.parametrize("truncate", [False, True, None])
def test_rope_inv_freq_matches_transformers_yarn(truncate):
    """Our float32 YaRN table follows HF's formula, `truncate` included (EasyDeL ignores it)."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model.rope import hf_config_frequencies

    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    if truncate is not None:
        rope["truncate"] = truncate
    config = GptOssConfig(head_dim=64, rope_parameters=dict(rope))
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv, scale = hf_config_frequencies(config)
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6)
    assert scale == pytest.approx(hf_scale, rel=1e-12)
    table = easydel_fixes.rope_table(config, 300)
    assert table.dtype == np.float32 and table.shape == (300, 64)
    np.testing.assert_allclose(table[299, :32], np.cos(299 * hf_inv.double().numpy()) * hf_scale,
                               atol=1e-5)


def test_unknown_fix_name_is_rejected():
    with pytest.raises(ValueError, match="unknown EasyDeL fix"):
        easydel_fixes.check_fixes({"rope_tabel"})
