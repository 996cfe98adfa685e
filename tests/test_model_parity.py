"""Our draft (inference form) against the reference `dflash.model.DFlashDraftModel`, float32.

Each case: the reference with random weights is saved with save_pretrained, loaded through
`model.load_draft`, and both run on the same random inputs; max abs error <= 1e-4.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dflash.model import build_target_layer_ids as ref_build_target_layer_ids
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

import model
from model.rope import rope_frequencies
from tests._model_fixtures import (GPT_OSS_YARN, reference_config, reference_forward,
                                   reference_logits, reference_model)

TOL = 1e-4
draft_hidden = jax.jit(model.draft_hidden, static_argnums=0)  # one compile, not one per op

CASES = {
    # K=1, B=8, plain RoPE, no bias, full attention only.
    "k1_b8_default_nobias": dict(num_features=1, block_size=8),
    # GPT-OSS rope (YaRN, theta 150k, truncate false), bias, mixed full/sliding, K=5, B=16.
    "k5_b16_yarn_bias_sliding": dict(
        num_features=5, block_size=16, bias=True, rope_theta=150000.0,
        rope_scaling=GPT_OSS_YARN, layer_types=("sliding_attention", "full_attention",
                                                "sliding_attention"),
        sliding_window=7, layers=3),
    # Sliding layers with use_sliding_window false: causal, no window (Qwen3Config semantics).
    "k5_b8_causal_sliding_nowindow": dict(
        num_features=5, block_size=8, layer_types=("full_attention", "sliding_attention")),
    # YaRN with the transformers default truncate=True, K=1, B=16, 8 q heads over 1 kv head.
    "k1_b16_yarn_truncate_mqa": dict(
        num_features=1, block_size=16, heads=8, kv_heads=1, head_dim=8, bias=True,
        rope_scaling={"rope_type": "yarn", "factor": 8.0,
                      "original_max_position_embeddings": 256}),
    # Logit multiplier and softcap (reference dflash_config keys).
    "k5_b8_logit_scaling": dict(num_features=5, block_size=8,
                                extra_dflash={"output_multiplier": 0.5,
                                              "final_logit_softcapping": 3.0}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_form_matches_reference(name, tmp_path):
    kwargs = CASES[name]
    ref = reference_model(reference_config(**kwargs))
    ref.save_pretrained(tmp_path)
    config, params = model.load_draft(tmp_path)
    assert config.num_features == kwargs["num_features"]
    assert config.block_size == kwargs["block_size"]

    rng = np.random.default_rng(0)
    b, ctx, bs = 2, 40, config.block_size  # 40 > every sliding window above
    start = 3000  # positions as in generation: a context slice [start-ctx, start+B)
    feats = rng.normal(size=(b, ctx, config.num_features * config.hidden_size)).astype(np.float32)
    noise = rng.normal(size=(b, bs, config.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(start - ctx, start + bs), (b, ctx + bs)).copy()
    want = reference_forward(ref, feats, noise, pos)
    got = np.asarray(draft_hidden(config, params, jnp.asarray(feats), jnp.asarray(noise),
                                        jnp.asarray(pos)))
    assert got.shape == (b, bs, config.hidden_size)
    assert np.abs(got - want).max() <= TOL

    lm_head = rng.normal(size=(config.vocab_size, config.hidden_size)).astype(np.float32)
    want_logits = reference_logits(ref, want, lm_head)
    got_logits = np.asarray(model.draft_logits(config, jnp.asarray(got), jnp.asarray(lm_head)))
    assert np.abs(got_logits - want_logits).max() <= TOL


def test_empty_context_and_short_context_match_reference(tmp_path):
    """Anchor 0 (no context) and a context shorter than the window, on sliding layers."""
    ref = reference_model(reference_config(
        layer_types=("sliding_attention", "full_attention"), sliding_window=6, block_size=8))
    ref.save_pretrained(tmp_path)
    config, params = model.load_draft(tmp_path)
    rng = np.random.default_rng(1)
    for ctx in (0, 1, 3):
        feats = rng.normal(size=(1, ctx, 5 * 64)).astype(np.float32)
        noise = rng.normal(size=(1, 8, 64)).astype(np.float32)
        pos = np.arange(ctx + 8)[None]
        want = reference_forward(ref, feats, noise, pos)
        got = draft_hidden(config, params, jnp.asarray(feats), jnp.asarray(noise),
                                 jnp.asarray(pos))
        assert np.abs(np.asarray(got) - want).max() <= TOL


def test_build_target_layer_ids_matches_reference():
    for num_target_layers in range(2, 81):
        for k in range(1, 13):
            assert model.build_target_layer_ids(num_target_layers, k) == \
                ref_build_target_layer_ids(num_target_layers, k), (num_target_layers, k)
    assert model.build_target_layer_ids(24, 5) == [1, 6, 11, 16, 21]
    assert model.build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]


GPT_OSS_20B = {  # the fields of openai/gpt-oss-20b config.json that a draft reads
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "rms_norm_eps": 1e-5,
    "rope_theta": 150000, "rope_scaling": dict(GPT_OSS_YARN), "attention_bias": True,
    "max_position_embeddings": 131072, "num_local_experts": 32, "sliding_window": 128,
}


def test_from_target_gpt_oss_matches_released_draft_and_reference_rope():
    config = model.DraftConfig.from_target(GPT_OSS_20B, num_draft_layers=8, block_size=8,
                                           mask_token_id=200000)
    assert config.target_layer_ids == (1, 6, 11, 16, 21)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (2880, 7680, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (64, 8)
    assert config.attention_bias and config.vocab_size == 201088
    assert config.layer_types == ("full_attention",) * 8
    # The exported config, read by transformers, gives the same RoPE as ours: frequencies within
    # one float32 ulp (torch's SLEEF pow is not correctly rounded; see model.rope), same scaling.
    from transformers import Qwen3Config

    hf = Qwen3Config(**config.to_hf_dict())
    rotary = Qwen3RotaryEmbedding(hf)
    inv_freq, scaling = rope_frequencies(config)
    ref_inv = rotary.inv_freq.numpy()
    np.testing.assert_array_max_ulp(inv_freq, ref_inv, maxulp=1)
    assert scaling == rotary.attention_scaling
    pos = torch.arange(0, 8192)[None]
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = model.rope.rope_cos_sin(config, jnp.asarray(pos.numpy()))
    # All the cos/sin difference is that ulp turned into an angle: position x frequency delta.
    bound = 8191 * np.abs(inv_freq - ref_inv).max() * scaling + 1e-6
    assert np.abs(np.asarray(cos) - cos_ref.numpy()).max() <= bound
    assert np.abs(np.asarray(sin) - sin_ref.numpy()).max() <= bound


def test_rope_matches_transformers_exactly_when_frequencies_agree():
    """theta 10000 YaRN (frequencies bit-equal): cos/sin agree to float32 rounding up to 131072."""
    from transformers import Qwen3Config

    config = model.DraftConfig.from_target(dict(GPT_OSS_20B, rope_theta=10000), num_draft_layers=2,
                                           block_size=8, mask_token_id=1)
    rotary = Qwen3RotaryEmbedding(Qwen3Config(**config.to_hf_dict()))
    inv_freq, _ = rope_frequencies(config)
    np.testing.assert_array_equal(inv_freq, rotary.inv_freq.numpy())
    pos = torch.arange(0, 131072, 3)[None]
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = model.rope.rope_cos_sin(config, jnp.asarray(pos.numpy()))
    assert np.abs(np.asarray(cos) - cos_ref.numpy()).max() <= 1e-6
    assert np.abs(np.asarray(sin) - sin_ref.numpy()).max() <= 1e-6
    for scaling in ({"rope_type": "linear", "factor": 4.0}, None):
        other = dataclasses.replace(config, rope_scaling=scaling and tuple(scaling.items()))
        rotary = Qwen3RotaryEmbedding(Qwen3Config(**other.to_hf_dict()))
        np.testing.assert_array_equal(rope_frequencies(other)[0], rotary.inv_freq.numpy())
