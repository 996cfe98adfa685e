"""Training form (all blocks of a sequence in one forward) == inference form run block by block.

Block n with anchor a must equal the inference forward on context features [0, a) with
position_ids [0..a-1, a..a+B-1]. The oracle is the reference `DFlashDraftModel` forward per block
(and our own `draft_hidden`, itself checked against the reference in test_model_parity.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.attention import block_sparse_attention
from tests._model_fixtures import reference_config, reference_forward, reference_model

TOL = 1e-4
T = 40  # sequence length; anchors include 0, 1, T-1 and T (all context visible)
train = jax.jit(model.draft_hidden_train, static_argnums=0,
                static_argnames=("implementation", "chunk_blocks"))
ANCHORS = np.array([[0, 1, 17, T - 1, 6, T, 29], [3, T - 2, 0, 11, 2, 25, T - 5]], np.int32)

LAYOUTS = {
    # mixed full + sliding (window 6 < T): causal windowed layer, bidirectional full layer
    "full_sliding_w6": dict(layer_types=("sliding_attention", "full_attention"), sliding_window=6),
    # sliding without use_sliding_window: causal and unwindowed (Qwen3Config semantics), YaRN
    "sliding_causal": dict(layer_types=("sliding_attention", "sliding_attention"),
                           rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 32}),
    # config.is_causal=False overrides: symmetric window inside the block
    "noncausal_window": dict(layer_types=("full_attention", "sliding_attention"),
                             sliding_window=3, is_causal=False, bias=True),
}


def _setup(tmp_path, layout, block_size=8):
    ref = reference_model(reference_config(block_size=block_size, **LAYOUTS[layout]))
    ref.save_pretrained(tmp_path)
    config, params = model.load_draft(tmp_path)
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(2, T, config.num_features * config.hidden_size)).astype(np.float32)
    emb = rng.normal(size=(2, ANCHORS.shape[1], block_size, config.hidden_size)).astype(np.float32)
    return ref, config, params, feats, emb


def _reference_blocks(ref, feats, emb, anchors, positions=None):
    out = np.zeros_like(emb)
    bs = emb.shape[2]
    for i in range(anchors.shape[0]):
        for n, a in enumerate(anchors[i]):
            pos = np.arange(a + bs) if positions is None else np.concatenate(
                [positions[i, :a], positions[i, a] + np.arange(bs)])
            out[i, n] = reference_forward(ref, feats[i:i + 1, :a], emb[i:i + 1, n], pos[None])[0]
    return out


# Formulations: default (one chunk at this size), 3 chunks of 3 blocks (2 of them padding), dense.
FORMS = {"default": {}, "chunked": {"chunk_blocks": 3}, "dense": {"implementation": "dense"}}


@pytest.mark.parametrize("layout,forms", [("full_sliding_w6", ("default", "chunked", "dense")),
                                          ("sliding_causal", ("chunked",)),
                                          ("noncausal_window", ("chunked",))])
def test_train_form_equals_reference_block_by_block(layout, forms, tmp_path):
    ref, config, params, feats, emb = _setup(tmp_path, layout)
    want = _reference_blocks(ref, feats, emb, ANCHORS)
    for form in forms:
        got = train(config, params, jnp.asarray(feats), jnp.asarray(emb), jnp.asarray(ANCHORS),
                  **FORMS[form])
        assert got.shape == emb.shape
        assert np.abs(np.asarray(got) - want).max() <= TOL, form


def test_train_form_equals_our_inference_form(tmp_path):
    """The literal statement: draft_hidden_train == draft_hidden per block (anchors 0, 17, T)."""
    _, config, params, feats, emb = _setup(tmp_path, "full_sliding_w6")
    got = train(config, params, jnp.asarray(feats), jnp.asarray(emb), jnp.asarray(ANCHORS),
                chunk_blocks=2)
    infer = jax.jit(model.draft_hidden, static_argnums=0)
    for n in (0, 2, 5):
        a = ANCHORS[0, n]
        want = infer(config, params, jnp.asarray(feats[:1, :a]), jnp.asarray(emb[:1, n]),
                     jnp.arange(a + config.block_size)[None])
        assert np.abs(np.asarray(got[0, n]) - np.asarray(want[0])).max() <= TOL, a


def test_seq_positions_offset_rope(tmp_path):
    """Context RoPE positions given (offset by 1000): block n starts at seq_positions[a]."""
    ref, config, params, feats, emb = _setup(tmp_path, "full_sliding_w6", block_size=16)
    anchors = np.minimum(ANCHORS, T - 1)
    positions = np.broadcast_to(np.arange(T) + 1000, (2, T)).astype(np.int32)
    want = _reference_blocks(ref, feats, emb, anchors, positions)
    got = train(config, params, jnp.asarray(feats), jnp.asarray(emb), jnp.asarray(anchors),
                seq_positions=jnp.asarray(positions))
    assert np.abs(np.asarray(got) - want).max() <= TOL


def test_bfloat16_training_form_tracks_float32(tmp_path):
    """bf16 params and inputs (the training dtype) give bf16 outputs within bf16 rounding of f32."""
    _, config, params, feats, emb = _setup(tmp_path, "full_sliding_w6")
    args = (jnp.asarray(feats), jnp.asarray(emb))
    want = np.asarray(train(config, params, *args, jnp.asarray(ANCHORS)))
    bf16 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)  # noqa: E731
    got = train(config, bf16(params), *bf16(args), jnp.asarray(ANCHORS), chunk_blocks=3)
    assert got.dtype == jnp.bfloat16
    # a few bf16 roundings (2^-8 relative each) through two layers and the final norm
    assert np.abs(np.asarray(got, np.float32) - want).max() <= 4 * 2.0 ** -8 * np.abs(want).max()


@pytest.mark.parametrize("causal,window", [(False, None), (True, 6)])
def test_chunked_gradients_equal_dense_mask(causal, window):
    """Backward of the chunked, rematerialised split == backward of the dense-mask formulation."""
    rng = np.random.default_rng(3)
    b, n, bs, hq, hk, d, t = 2, 7, 8, 4, 2, 16, T
    shapes = [(b, n, bs, hq, d), (b, t, hk, d), (b, t, hk, d), (b, n, bs, hk, d), (b, n, bs, hk, d)]
    args = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]
    weight = jnp.asarray(rng.normal(size=shapes[0]).astype(np.float32))

    def loss(q, kc, vc, kb, vb, impl, chunk):
        out = block_sparse_attention(q, kc, vc, kb, vb, jnp.asarray(ANCHORS), causal=causal,
                                     window=window, scale=0.25, implementation=impl,
                                     chunk_blocks=chunk)
        return jnp.sum(out * weight)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5, 6))
    for a, b_ in zip(grad(*args, "xla", 3), grad(*args, "dense", None)):
        assert np.abs(np.asarray(a) - np.asarray(b_)).max() <= TOL


def test_chunked_attention_memory_is_bounded():
    """Compiled fwd+bwd temp memory: the chunked split stays far below the dense mask's, and
    sliding layers (window gather) below full ones. 64 blocks x 8 over 512 positions."""
    b, n, bs, hq, hk, d, t = 1, 64, 8, 4, 2, 16, 512
    q, kb = jnp.zeros((b, n, bs, hq, d)), jnp.zeros((b, n, bs, hk, d))
    kc, anchors = jnp.zeros((b, t, hk, d)), jnp.zeros((b, n), jnp.int32)

    def temp_bytes(**kw):
        def loss(q, kc, vc, kb, vb):
            return block_sparse_attention(q, kc, vc, kb, vb, anchors, scale=0.25, **kw).sum()
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return f.lower(q, kc, kc, kb, kb).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(causal=False, window=None, implementation="dense")
    split = temp_bytes(causal=False, window=None, implementation="xla", chunk_blocks=8)
    window = temp_bytes(causal=True, window=16, implementation="xla", chunk_blocks=8)
    dense_scores = b * hq * n * bs * (t + n * bs) * 4  # one float32 score matrix
    assert dense >= dense_scores
    assert split * 8 < dense
    assert window < split
