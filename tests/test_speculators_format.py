"""The speculators format in our own code (no torch): every field out and back in, format
detection on load, and one-line refusals of configs the format cannot express."""
import json

import jax
import numpy as np
import pytest

import model
from model.io import load_draft, save_draft
from model.speculators_format import FormatError, from_speculators_dict, to_speculators_dict
from tests._speculators_fixtures import YARN, random_params, tiny_config
from tools import export_draft

VARIANTS = {
    "base": {},
    "sliding_noncausal": dict(is_causal=False),
    "no_bias_plain_rope": dict(attention_bias=False, rope_scaling=None, rope_theta=5e5),
    "all_full_eps": dict(layer_types=("full_attention",) * 2, sliding_window=None,
                         rms_norm_eps=1e-3),
    "linear_rope_b16": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, block_size=16),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_survives_speculators_dict(name):
    config = tiny_config(**VARIANTS[name])
    d = json.loads(json.dumps(to_speculators_dict(config)))
    assert d["speculators_model_type"] == "dflash"
    assert d["aux_hidden_state_layer_ids"] == [i + 1 for i in config.target_layer_ids]
    assert d["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == (
        config.block_size - 1)
    assert from_speculators_dict(d) == config


def test_export_and_load_speculators_directory(tmp_path):
    config = tiny_config()
    params = random_params(config)
    src = tmp_path / "zlab"
    save_draft(src, config, params)
    out = tmp_path / "spec"
    assert export_draft.main([str(src), str(out), "--format", "speculators",
                              "--dtype", "bfloat16", "--verifier", "openai/gpt-oss-20b"]) == 0
    d = json.loads((out / "config.json").read_text())
    assert d["speculators_model_type"] == "dflash" and d["dtype"] == "bfloat16"
    assert d["speculators_config"]["verifier"]["name_or_path"] == "openai/gpt-oss-20b"
    loaded, got = load_draft(out)
    assert loaded == config
    want = jax.tree.map(lambda x: np.asarray(x.astype("bfloat16")), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
    # and back to z-lab: the same draft again
    back = tmp_path / "back"
    assert export_draft.main([str(out), str(back)]) == 0
    assert "speculators_model_type" not in json.loads((back / "config.json").read_text())
    assert load_draft(back)[0] == config


def test_speculators_checkpoint_with_verifier_tensors_loads(tmp_path):
    """speculators may save embed_tokens / lm_head / verifier_norm: not draft params, dropped."""
    from safetensors.numpy import load_file, save_file

    config = tiny_config()
    out = save_draft(tmp_path / "d", config, random_params(config), fmt="speculators")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["lm_head.weight"] = np.zeros((64, 64), np.float32)
    tensors["verifier_norm.weight"] = np.zeros((64,), np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    assert load_draft(out)[0] == config


REFUSED = {
    "logit_scaling": (dict(logits_scaling=0.5), "logits_scaling"),
    "softcap": (dict(final_logit_softcapping=3.0), "final_logit_softcapping"),
    "causal_full": (dict(is_causal=True), "is_causal"),
    "unwindowed_sliding": (dict(sliding_window=None), "sliding_window"),
    "last_target_layer": (dict(target_layer_ids=(1, 3, 7)), "last layer"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unexpressible_config_is_refused_in_one_line(name, tmp_path, capsys):
    overrides, word = REFUSED[name]
    config = tiny_config(**overrides)
    with pytest.raises(FormatError, match=word):
        to_speculators_dict(config)
    src = save_draft(tmp_path / "zlab", config, random_params(config))
    out = tmp_path / "spec"
    assert export_draft.main([str(src), str(out), "--format", "speculators"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export to the speculators format") and "\n" not in err
    assert word in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("change,word", [
    ({"speculators_model_type": "eagle3"}, "speculators_model_type"),
    ({"sample_from_anchor": True}, "sample_from_anchor"),
    ({"draft_vocab_size": 32}, "reduced draft vocabulary"),
])
def test_unsupported_speculators_config_is_refused_on_load(change, word, tmp_path, capsys):
    config = tiny_config()
    out = save_draft(tmp_path / "d", config, random_params(config), fmt="speculators")
    d = json.loads((out / "config.json").read_text())
    d.update(change)
    (out / "config.json").write_text(json.dumps(d))
    assert export_draft.main([str(out), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and word in err and "\n" not in err


def test_speculators_converted_config_takes_depth_from_local_verifier(tmp_path):
    """speculators' own converter drops num_target_layers; a local verifier config supplies it."""
    config = tiny_config()
    d = to_speculators_dict(config, verifier=str(tmp_path / "verifier"))
    del d["transformer_layer_config"]["num_target_layers"]
    (tmp_path / "verifier").mkdir()
    (tmp_path / "verifier" / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
    out = save_draft(tmp_path / "d", config, random_params(config), fmt="speculators")
    (out / "config.json").write_text(json.dumps(d))
    assert model.load_config(out) == config
