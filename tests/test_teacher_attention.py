"""The teacher's blocksparse attention (the TPU default) against HF torch on a held-out config,
at a T that is a multiple of its block (512) and one that is not (padded on the right), and the
proof that right padding leaves the real positions' features unchanged.

On CPU EasyDeL's blocksparse runs ejkernel's XLA version of the splash kernel (the same masking
and sink semantics as the TPU Pallas kernel, pipeline/teacher/attention.py); the TPU program
itself is compiled by tools.tpu_compile (docs/TPU.md).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.teacher.attention import resolve_attention, run_length
from pipeline.teacher.easydel_teacher import Teacher, _forward
from tests._teacher_fixtures import HIDDEN, hf_outputs, tiny_model_dir

LAYERS = (0, 1, 2, 3)  # sliding (window 8), full, sliding, full
TOL = 1e-4  # float32, as tests/test_teacher_fidelity.py
BLOCK = 512


def _ids(b, t, seed=1):
    return np.random.default_rng(seed).integers(0, 128, size=(b, t)).astype(np.int32)


def _rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _errors(feats, logits, ref):
    out = {f"layer{i}": _rel(np.asarray(feats)[..., k * HIDDEN:(k + 1) * HIDDEN],
                             ref["hidden_states"][i + 1]) for k, i in enumerate(LAYERS)}
    out["logits"] = _rel(logits, ref["logits"])
    return out


@functools.cache
def _teacher(attention):
    return Teacher.from_pretrained(str(tiny_model_dir()), dtype=jnp.float32, attention=attention,
                                   compilation_cache="off")


def test_resolve_and_run_length():
    assert resolve_attention("auto", "tpu") == "blocksparse"
    assert resolve_attention("auto", "cpu") == "vanilla"
    assert resolve_attention("vanilla", "tpu") == "vanilla"
    with pytest.raises(UserError, match="--attention must be one of"):
        resolve_attention("flash_attn2", "tpu")
    assert run_length(3072, "blocksparse") == 3072
    assert run_length(3000, "blocksparse") == 3072
    assert run_length(3000, "vanilla") == 3000
    with pytest.raises(UserError, match="runs as 1536 tokens") as e:
        run_length(1030, "blocksparse", max_positions=1024)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [BLOCK, 300])
def test_blocksparse_matches_hf(seq_len):
    t = _teacher("blocksparse")
    assert t.attention == "blocksparse" and t.attention_block == BLOCK
    assert t.run_length(seq_len) == BLOCK
    ids = _ids(2, seq_len)
    mask = np.ones_like(ids)
    logits, feats = t.forward(ids, mask, LAYERS, logits="all")
    assert feats.shape == (2, seq_len, 4 * HIDDEN) and logits.shape == (2, seq_len, 128)
    errs = _errors(feats, logits, hf_outputs(tiny_model_dir(), ids, mask))
    print(f"blocksparse T={seq_len}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs


@pytest.mark.slow
def test_padded_forward_never_falls_back_to_vanilla(monkeypatch):
    """EasyDeL's blocksparse silently runs vanilla when T is not a multiple of its block; the
    teacher's padded length never does, the raw length does (the reason to pad)."""
    import easydel.operations.kernels.blocksparse_attention as bsa

    class Refused:
        def __init__(self, *a, **k):
            raise AssertionError("blocksparse fell back to vanilla")

    monkeypatch.setattr(bsa, "VanillaAttn", Refused)
    t = _teacher("blocksparse")
    from flax import nnx

    gdef, _ = nnx.split(t._model)

    def trace(length):  # a fresh partial: traced anew, whatever was compiled before
        fn = functools.partial(_forward, gdef, layer_ids=(1,), logits_at=None)
        ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
        with t.mesh:
            return jax.eval_shape(fn, t._state, ids, jax.ShapeDtypeStruct((2, length), jnp.bool_))

    assert trace(t.run_length(300))[0].shape == (2, BLOCK, HIDDEN)
    with pytest.raises(AssertionError, match="fell back"):
        trace(300)


@pytest.mark.slow
def test_right_padding_leaves_real_positions_unchanged():
    """Under causal attention no query sees a later key, and the MoE routes each token alone:
    the features of positions < T do not depend on what follows them (vanilla, no padding of
    its own, so the two runs differ only in the junk tokens appended)."""
    t = _teacher("vanilla")
    assert t.attention == "vanilla" and t.run_length(300) == 300
    ids = _ids(2, 300)
    junk = _ids(2, BLOCK - 300, seed=7)
    for pad_mask in (0, 1):  # the padding marked as padding, or as real tokens
        padded = np.concatenate([ids, junk], axis=1)
        mask = np.concatenate([np.ones_like(ids), np.full_like(junk, pad_mask)], axis=1)
        logits_p, feats_p = t.forward(padded, mask, LAYERS, logits="all")
        logits, feats = t.forward(ids, np.ones_like(ids), LAYERS, logits="all")
        err = max(_rel(np.asarray(feats_p)[:, :300], feats), _rel(np.asarray(logits_p)[:, :300], logits))
        print(f"padding marked {pad_mask}: max relative difference {err:.2e}")
        assert err <= 1e-6, err
    # and the junk does change the padded positions themselves (the check could fail)
    other = np.concatenate([ids, _ids(2, BLOCK - 300, seed=8)], axis=1)
    _, feats_o = t.forward(other, np.ones_like(other), LAYERS, logits="all")
    assert _rel(np.asarray(feats_o)[:, 300:], np.asarray(feats_p)[:, 300:]) > 1e-2
