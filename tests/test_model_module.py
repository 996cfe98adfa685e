"""The `DFlashDraft` Linen module: its KV-cached decode form against its inference form (itself
checked against the reference in test_model_parity.py); its variables against the msgpack and
z-lab trees that io.py reads and writes. The harness's CachedDraft is this decode form (tested
against the reference in test_spec_decode.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import model
from model import DFlashDraft, DraftConfig

TOL = 1e-5  # float32, same math in another order (no reduced precision anywhere)
CAP = 48  # cache capacity; positions past ctx_len hold garbage that must never be read

# Mixed layers: a causal windowed layer (window 5 < context) and a bidirectional full layer,
# biases, YaRN, a logit multiplier and softcap, a non-unit embedding scale.
CONFIG = DraftConfig.tiny(
    attention_bias=True, layer_types=("sliding_attention", "full_attention"), sliding_window=5,
    rope_scaling=(("factor", 4.0), ("original_max_position_embeddings", 32), ("rope_type", "yarn")),
    logits_scaling=0.5, final_logit_softcapping=3.0, input_embedding_scale=1.5)


def _random_params(config, seed=0):
    """Initial params moved off their init values (norm scales 1, biases 0) so each one counts."""
    params = model.init_draft_params(config, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [x + jnp.asarray(0.08 * rng.normal(size=x.shape), x.dtype) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


def _decode(config, params, feats, steps, blocks):
    """Harness-style decode: append feats in chunks of `steps` (each padded with garbage rows to
    a multiple of 8, as the harness pads to buckets), propose a block after each append.
    blocks: per append, (tokens [b, B], n_valid). Returns per append (ctx_len, logits)."""
    module, variables = DFlashDraft(config), model.as_variables(params)
    append = jax.jit(lambda c, f, s: module.apply(variables, c, f, s, method="append_context"))
    propose = jax.jit(lambda c, t, n, v: module.apply(variables, c, EMB, LM_HEAD, t, n, v,
                                                      method="propose_logits"))
    cache = model.empty_cache(config, feats.shape[0], CAP)
    cache = jax.tree.map(lambda x: x + 7.0, cache)  # garbage beyond ctx_len must not matter
    rng = np.random.default_rng(3)
    out, ctx_len = [], 0
    for n, (tokens, n_valid) in zip(steps, blocks):
        pad = -(-n // 8) * 8
        chunk = rng.normal(size=(feats.shape[0], pad, feats.shape[2])).astype(np.float32)
        chunk[:, :n] = feats[:, ctx_len:ctx_len + n]
        cache = append(cache, jnp.asarray(chunk), jnp.int32(ctx_len))
        ctx_len += n
        out.append((ctx_len, cache, propose(cache, jnp.asarray(tokens), jnp.int32(ctx_len),
                                            jnp.int32(n_valid))))
    return out


RNG = np.random.default_rng(11)
EMB = jnp.asarray(RNG.normal(size=(CONFIG.vocab_size, CONFIG.hidden_size)), jnp.float32)
LM_HEAD = jnp.asarray(RNG.normal(size=(CONFIG.vocab_size, CONFIG.hidden_size)), jnp.float32)
FEATS = RNG.normal(size=(2, 30, CONFIG.num_features * CONFIG.hidden_size)).astype(np.float32)
STEPS = (13, 1, 8, 3)  # a prefill, then accepted-token steps (1..B)
N_VALID = (8, 8, 3, 1)  # full blocks, then shorter tail blocks (padding rows past n_valid)
TOKENS = [RNG.integers(0, CONFIG.vocab_size, size=(2, CONFIG.block_size)) for _ in STEPS]


def test_cached_decode_equals_inference_form():
    """Every decode step (padded appends, tail blocks) == the inference form on the whole
    context [0, ctx_len) and the first n_valid block tokens, rows < n_valid."""
    params = _random_params(CONFIG)
    infer = jax.jit(model.draft_hidden, static_argnums=0)
    got = _decode(CONFIG, params, FEATS, STEPS, list(zip(TOKENS, N_VALID)))
    for (ctx_len, _, logits), tokens, n_valid in zip(got, TOKENS, N_VALID):
        noise = model.embed_block(CONFIG, EMB, jnp.asarray(tokens[:, :n_valid]))
        pos = jnp.broadcast_to(jnp.arange(ctx_len + n_valid), (2, ctx_len + n_valid))
        hidden = infer(CONFIG, params, jnp.asarray(FEATS[:, :ctx_len]), noise, pos)
        want = np.asarray(model.draft_logits(CONFIG, hidden, LM_HEAD))
        assert logits.shape == (2, CONFIG.block_size, CONFIG.vocab_size)
        err = np.abs(np.asarray(logits)[:, :n_valid] - want).max()
        assert err <= TOL, (ctx_len, n_valid, err)


def test_module_init_and_variables_match_the_list_form_and_checkpoints(tmp_path):
    """DFlashDraft.init gives the tree of init_draft_params (names, shapes, logical axes); the
    msgpack's params and the z-lab tensor names are the module's variables, unconverted."""
    config = DraftConfig.tiny(attention_bias=True)
    feats, noise = jnp.ones((1, 3, 3 * 64)), jnp.ones((1, 8, 64))
    pos = jnp.arange(11)[None]
    boxed = DFlashDraft(config).init(jax.random.key(0), feats, noise, pos)
    listed = model.init_draft_params(config, jax.random.key(0))
    assert jax.tree.structure(model.from_variables(nn.meta.unbox(boxed))) == \
        jax.tree.structure(listed)
    assert jax.tree.map(jnp.shape, model.from_variables(nn.meta.unbox(boxed))) == \
        jax.tree.map(jnp.shape, listed)
    assert model.from_variables(nn.get_partition_spec(boxed)) == model.param_logical_axes(config)
    round_trip = model.from_variables(model.as_variables(listed))
    assert jax.tree.structure(round_trip) == jax.tree.structure(listed)
    assert all(a is b for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(listed)))

    params = _random_params(config, seed=2)
    model.save_msgpack(tmp_path / "draft_params.msgpack", config, params)
    state = serialization.msgpack_restore((tmp_path / "draft_params.msgpack").read_bytes())
    got = DFlashDraft(config).apply({"params": state["params"]}, feats, noise, pos)
    want = model.draft_hidden(config, params, feats, noise, pos)
    assert np.array_equal(np.asarray(got), np.asarray(want))

    module_paths = {".".join(str(getattr(k, "key", k)) for k in path) for path, _ in
                    jax.tree_util.tree_flatten_with_path(model.as_variables(params)["params"])[0]}
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    zlab = {p.rsplit(".", 1)[0] + "." + suffix[p.rsplit(".", 1)[1]] for p in module_paths}
    assert zlab == set(model.io.to_hf_state_dict(config, params))


def test_cached_decode_matches_reference(tmp_path):
    """The cached form against the reference DFlashDraftModel directly (as strict as
    test_model_parity.py): context appended in two padded chunks, a full and tail blocks, on
    GPT-OSS-like layers (YaRN, bias, a sliding layer with window 6 < context, a full layer)."""
    from tests._model_fixtures import (GPT_OSS_YARN, reference_config, reference_forward,
                                       reference_model)

    ref = reference_model(reference_config(
        num_features=5, block_size=8, bias=True, rope_theta=150000.0, rope_scaling=GPT_OSS_YARN,
        layer_types=("sliding_attention", "full_attention"), sliding_window=6))
    ref.save_pretrained(tmp_path)
    config, params = model.load_draft(tmp_path)
    module, variables = DFlashDraft(config), model.as_variables(params)
    rng = np.random.default_rng(4)
    ctx = rng.normal(size=(1, 21, 5 * 64)).astype(np.float32)
    noise = rng.normal(size=(1, 8, 64)).astype(np.float32)
    cache = model.empty_cache(config, 1, 32)
    first = np.pad(ctx[:, :13], ((0, 0), (0, 3), (0, 0)), constant_values=5.0)  # padded chunk
    cache = module.apply(variables, cache, jnp.asarray(first), 0, method="append_context")
    cache = module.apply(variables, cache, jnp.asarray(ctx[:, 13:]), 13,
                         method="append_context")
    for n in (8, 5, 1):
        want = reference_forward(ref, ctx, noise[:, :n], np.arange(21 + n)[None])
        got = module.apply(variables, cache, jnp.asarray(noise), 21, n, method="propose")
        assert np.abs(np.asarray(got)[:, :n] - want).max() <= 1e-4, n
