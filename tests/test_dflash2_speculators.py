"""Our DFlash2 draft and loss against `speculators` 0.9.0's dflash2 model (torch, .venv-ref),
float32, on the same features, anchors and params (tests/_speculators_dflash2_oracle.py):

- format: our `--format speculators` DFlash2 export loads into its DFlash2DraftModel with no
  unexpected key (missing: only the verifier's tensors, loaded from the verifier), it reads the
  four DFlash2 fields back, and what its own save_pretrained writes loads back here as the
  same config and params;
- the backbone's hidden states equal our training form's (convolutions reset per block);
- loss parity: its total (unary KL + alpha x selector CE over `selector_training_candidates`)
  against our train step's, per part; candidate recall and teacher-forced selector accuracy
  counts; the gradient of every parameter.

Normalisation (documented, as for DFlash in tests/test_speculators_parity.py): speculators
divides each part's weighted sum by the count of supervised slots + 1e-5, we by the sum of the
weights applied; so loss_spec * (count + 1e-5) == loss_ours * sum(w), part by part and for the
total, and gradients scale the same way. Its targets are the verifier's distribution: the
verifier here is one-hot at our labels (tests/_speculators_fixtures.py), so they coincide.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.config import DFlash2Config
from model.io import load_draft, save_draft, to_hf_state_dict
from model.speculators_format import VERIFIER_OWNED
from tests._dflash2_fixtures import moved_params
from tests._speculators_fixtures import (case_batch, case_frozen, one_hot_verifier_states,
                                         run_oracle, tiny_config, write_verifier)
from train.anchors import block_labels
from train.loss import decay_weights
from train.loss_dflash2 import dflash2_loss

TOL = 1e-4
T, N = 40, 4
GAMMA, ALPHA = 4.0, 0.7


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec_dflash2")
    config = tiny_config(dflash2=DFlash2Config(selector_rank=16, selector_top_k=8))
    params = moved_params(config, seed=2)
    verifier = write_verifier(tmp / "verifier", config)
    rng = np.random.default_rng(3)
    input_ids = rng.integers(0, 63, size=(1, T)).astype(np.int32)
    loss_mask = np.ones((1, T), np.int32)
    loss_mask[0, :5] = 0
    loss_mask[0, 20:23] = 0
    anchors = np.array([[6, 13, 17, 26]], np.int32)
    valid = np.array([[True, True, True, False]])
    feats = rng.normal(size=(1, T, config.num_features * config.hidden_size)).astype(np.float32)
    inputs = dict(features=feats, input_ids=input_ids, loss_mask=loss_mask,
                  verifier_last=one_hot_verifier_states(verifier["lm_head.weight"], input_ids),
                  anchors=anchors[0], anchor_valid=valid[0])
    np.savez(tmp / "inputs.npz", **inputs)
    save_draft(tmp / "ours", config, params, fmt="speculators", verifier=str(tmp / "verifier"))
    job = dict(draft=str(tmp / "ours"), verifier=str(tmp / "verifier"),
               inputs=str(tmp / "inputs.npz"), out=str(tmp / "out.npz"), gamma=GAMMA,
               alpha=ALPHA, resave=str(tmp / "resaved"))
    (spec,) = run_oracle([job], tmp, script="_speculators_dflash2_oracle.py")
    return dict(config=config, params=params, verifier=verifier, inputs=inputs, spec=spec,
                anchors=anchors, valid=valid, resaved=tmp / "resaved")


def test_speculators_loads_our_export_and_its_resave_loads_here(case):
    spec, config = case["spec"], case["config"]
    info = json.loads(str(spec["info"]))
    assert not info.get("unexpected_keys") and not info.get("mismatched_keys")
    assert set(info.get("missing_keys", [])) <= set(VERIFIER_OWNED)
    assert json.loads(str(spec["fields"])) == config.dflash2.to_dict()
    loaded, params = load_draft(case["resaved"])
    assert loaded == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, case["params"])


def test_backbone_hidden_states_match_speculators(case):
    config, batch, frozen = case["config"], case_batch(case), case_frozen(case)
    blocks = model.block_tokens(config, batch["input_ids"], batch["anchors"])
    emb = model.embed_block(config, frozen["embed"], blocks)
    forward = jax.jit(model.draft_hidden_train, static_argnums=0)
    hidden = np.asarray(forward(config, case["params"], batch["features"], emb,
                                batch["anchors"]))[0]
    want = case["spec"]["hidden"].reshape(N, config.block_size, -1)
    valid = case["valid"][0]
    assert np.abs(hidden[valid] - want[valid]).max() <= TOL


def test_loss_metrics_and_gradients_match_speculators(case):
    config, spec = case["config"], case["spec"]
    bs = config.block_size
    params = jax.tree.map(jnp.asarray, case["params"])

    def loss_fn(p):  # train/step.py's loss_fn for --arch dflash2, from the same public pieces
        batch, frozen = case_batch(case), case_frozen(case)
        blocks = model.block_tokens(config, batch["input_ids"], batch["anchors"])
        emb = model.embed_block(config, frozen["embed"], blocks)
        hidden = model.draft_hidden_train(config, p, batch["features"], emb, batch["anchors"])
        labels, sup = block_labels(batch["input_ids"], batch["loss_mask"], batch["anchors"],
                                   batch["anchor_valid"], bs)
        return dflash2_loss(config, p, hidden, frozen["lm_head"], batch["input_ids"],
                            batch["anchors"], labels, sup, decay_weights(bs, GAMMA), alpha=ALPHA,
                            vocab_chunk=16, token_chunk=8)

    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    m = dict(m, loss=loss)
    mask = spec["aligned_mask"].reshape(N, bs)
    count = mask.sum()
    w_sum = (mask * np.exp(-(np.arange(bs) - 1.0) / GAMMA)).sum()
    norm = lambda x: float(x) * w_sum / (count + 1e-5)  # noqa: E731  ours in its normalisation
    assert abs(norm(m["unary_loss"]) - float(spec["metric/unary_loss_sum"])) <= TOL
    assert abs(norm(m["selector_loss"]) - float(spec["metric/selector_loss_sum"])) <= TOL
    assert abs(norm(m["loss"]) - float(spec["loss"])) <= TOL
    assert float(m["selector_loss"]) > 0.1  # a real second term
    k = config.dflash2.selector_top_k
    recall_sum = spec[f"metric/unary_candidate_recall_at_{k}_sum"]
    assert int(m["cand_hit"]) == int(recall_sum)
    assert int(np.asarray(m["slot_count"]).sum()) == int(
        spec[f"metric/unary_candidate_recall_at_{k}_total"])
    assert 0 < int(m["cand_hit"]) < int(np.asarray(m["slot_count"]).sum())  # injection happens
    assert int(m["selector_correct"]) == int(spec["metric/teacher_forced_selector_acc_sum"])
    assert int(m["cand_hit"]) == int(spec["metric/teacher_forced_selector_acc_total"])

    ours = to_hf_state_dict(config, grads)
    theirs = {k[len("grad/"):]: v for k, v in spec.items() if k.startswith("grad/")}
    assert set(theirs) == set(ours)
    scale = (count + 1e-5) / w_sum
    worst = max(np.abs(ours[k] - theirs[k] * scale).max() for k in ours)
    assert worst <= TOL
    for name in ("candidate_selector.predecessor_codebook", "layers.0.mlp_conv.base_kernel",
                 "layers.1.attention_conv.kernel_projection.weight"):
        assert np.abs(ours[name]).max() > 100 * TOL  # the additions train
