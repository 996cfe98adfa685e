"""Our DFlash2 draft against the reference `dflash.model.DFlash2DraftModel` (dflash==0.1.0),
float32: the reference loads our z-lab export (from_pretrained, with its key mapping) with no
missing or unexpected key, and gives the same draft hidden states, the same top-K candidates
and the same greedy path (`propose`) as ours; at temperature > 0 its q rows over the K
candidates equal ours given the same predecessors. Three configs: a tiny one, the tiny
teacher's shapes and gpt-oss-20b's shapes scaled down (tests/_dflash2_fixtures.py); the
params are moved away from init so that the convolutions and the selector all matter.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dflash.model import DFlash2DraftModel

import model
from model.io import save_draft
from tests._dflash2_fixtures import gpt_oss_scaled, moved_params, tiny_dflash2, tiny_teacher_shaped

TOL = 1e-4
CONFIGS = {"tiny": tiny_dflash2, "tiny_teacher": tiny_teacher_shaped, "gpt_oss_scaled": gpt_oss_scaled}


def _apply(config, params, *args, method):
    return model.DFlashDraft(config).apply(model.as_variables(params), *args, method=method)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    config = CONFIGS[request.param]()
    params = moved_params(config, seed=1)
    out = tmp_path_factory.mktemp(request.param)
    save_draft(out, config, params)
    ref, info = DFlash2DraftModel.from_pretrained(str(out), output_loading_info=True,
                                                  dtype=torch.float32)
    rng = np.random.default_rng(0)
    b, ctx, bs, h = 2, 24, config.block_size, config.hidden_size
    feats = rng.normal(size=(b, ctx, config.num_features * h)).astype(np.float32)
    tokens = rng.integers(0, config.vocab_size, size=(b, bs)).astype(np.int64)
    tokens[:, 1:] = config.mask_token_id
    embed = rng.normal(size=(config.vocab_size, h)).astype(np.float32)
    lm_head = (rng.normal(size=(config.vocab_size, h)) / np.sqrt(h)).astype(np.float32)
    noise = embed[tokens]
    pos = np.broadcast_to(np.arange(500 - ctx, 500 + bs), (b, ctx + bs)).copy()
    return dict(config=config, params=params, ref=ref.eval(), info=info, out=out, feats=feats,
                tokens=tokens, noise=noise, pos=pos, lm_head=lm_head)


def _head(lm_head):
    head = torch.nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(lm_head))
    return head


def _ref_hidden(case):
    with torch.no_grad():
        return case["ref"](position_ids=torch.from_numpy(case["pos"]),
                           noise_embedding=torch.from_numpy(case["noise"]),
                           target_hidden=torch.from_numpy(case["feats"]))


def test_reference_loads_our_export_without_missing_keys(case):
    info, config = case["info"], case["config"]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = json.loads((case["out"] / "config.json").read_text())
    assert cfg["architectures"] == ["DFlash2DraftModel"]
    assert {k: cfg["dflash_config"][k] for k in config.dflash2.FIELDS} == config.dflash2.to_dict()
    ref = case["ref"]  # the loaded tensors are ours (not re-initialised by post_init)
    sel = ref.candidate_selector
    np.testing.assert_array_equal(sel.predecessor_codebook.weight.detach().numpy(),
                                  np.asarray(case["params"]["candidate_selector"]
                                             ["predecessor_codebook"]))
    assert sel.top_k == config.dflash2.selector_top_k
    conv = ref.layers[0].attention_conv
    np.testing.assert_array_equal(conv.base_kernel.detach().numpy(),
                                  np.asarray(case["params"]["layers"][0]["attention_conv"]
                                             ["base_kernel"]))


def test_hidden_states_candidates_and_greedy_path_match_reference(case):
    config, params = case["config"], case["params"]
    want = _ref_hidden(case)
    got = _apply(config, params, jnp.asarray(case["feats"]), jnp.asarray(case["noise"]),
                 jnp.asarray(case["pos"]), method="__call__")
    assert np.abs(np.asarray(got) - want.numpy()).max() <= TOL
    # The identity-initialised draft would match a DFlash one; these params are not identity:
    plain = model.draft_hidden(dataclasses.replace(config, dflash2=None),
                               {k: v for k, v in params.items() if k != "candidate_selector"}
                               | {"layers": [{k: v for k, v in lay.items()
                                              if not k.endswith("_conv")}
                                             for lay in params["layers"]]},
                               jnp.asarray(case["feats"]), jnp.asarray(case["noise"]),
                               jnp.asarray(case["pos"]))
    assert np.abs(np.asarray(plain) - want.numpy()).max() > 100 * TOL

    head, anchors = _head(case["lm_head"]), torch.from_numpy(case["tokens"][:, 0])
    with torch.no_grad():
        ref_path, ref_cands, _ = case["ref"].propose(want[:, 1:], anchors, head, 0.0)
    path, cands, _ = _apply(config, params, got[:, 1:], jnp.asarray(case["lm_head"]),
                            jnp.asarray(case["tokens"][:, 0]), 0.0,
                            jnp.zeros(got.shape[:1] + (got.shape[1] - 1,)), method="select_path")
    # torch.topk(sorted=False) orders the candidates its own way: compare them as sets
    np.testing.assert_array_equal(np.sort(np.asarray(cands), -1), np.sort(ref_cands.numpy(), -1))
    np.testing.assert_array_equal(np.asarray(path), ref_path.numpy())
    # the selector matters here: its path is not the unary argmax everywhere
    unary = np.asarray(model.draft_logits(config, got[:, 1:], jnp.asarray(case["lm_head"])))
    assert (unary.argmax(-1) != np.asarray(path)).any()


def test_sampling_q_over_candidates_matches_reference(case):
    """At temperature 0.7 the reference samples a path; given that path as predecessors, our
    q over the K candidates of every slot equals its q (matched by candidate id)."""
    config, params = case["config"], case["params"]
    want = _ref_hidden(case)
    head, anchors = _head(case["lm_head"]), torch.from_numpy(case["tokens"][:, 0])
    torch.manual_seed(0)
    with torch.no_grad():
        path, cands, q = case["ref"].propose(want[:, 1:], anchors, head, 0.7)
    path, cands, q = path.numpy(), cands.numpy(), q.numpy()
    hidden = jnp.asarray(want[:, 1:].numpy())
    unary = model.draft_logits(config, hidden, jnp.asarray(case["lm_head"]))
    pred = np.concatenate([case["tokens"][:, :1], path[:, :-1]], axis=1)
    scores = _apply(config, params, jnp.take_along_axis(unary, jnp.asarray(cands), -1), hidden,
                    jnp.asarray(pred), jnp.asarray(cands), method="selector_scores")
    ours = np.asarray(jax.nn.softmax(scores / 0.7, axis=-1))
    assert np.abs(ours - q).max() <= TOL
    assert (q.max(-1) < 0.999).any()  # a real distribution, not a one-hot
