"""Issue 15 item 3: every field of a draft export survives export -> load in the three loaders
(ours, the reference `dflash` 0.1.0, `speculators` 0.9.0), and changing any one of them changes
the loaded model's output, so a dropped or misread field is caught.

Drafts go out the way users export them: a `model.save_msgpack` snapshot (what a training run
keeps) -> `tools.export_draft.export` to z-lab and to speculators. Ours loads both
(`model.load_draft`); the reference loads the z-lab one, speculators the speculators one, all
in one .venv-ref subprocess (tests/_export_fields_oracle.py). Each variant changes ONE field of
a base draft (YaRN, bias, mixed full/sliding layers, a window of 8 that binds).

Outputs: one block after a 40-position context at positions 3000.. (inference form: ours and
the reference, as `dflash_generate` runs it), and speculators' training form on anchors 12, 24,
36 of a 48-token sequence (beyond the window: it binds there too). Features come from one
hidden-state stack with a distinct random tensor per target layer, each loader indexing it in
its own convention, so a wrong layer id or offset changes what is read. The block is built by
each loader from its own mask_token_id and block_size and embedded with the target's embedding
(distinct rows), so those fields reach the output too.

Fields that no forward reads:
- num_target_layers: ours uses it to check a draft against its teacher and to refuse the
  target's last layer in the speculators format; the reference only to derive target_layer_ids
  when the config has none (dflash/model.py:563), and our exports always write them;
  speculators has no such field (models/dflash/config.py: DFlashSpeculatorConfig; its z-lab
  converter drops it, convert/dflash/converter.py:32): our export keeps it inside
  transformer_layer_config, which its Qwen3Config carries as an extra attribute. So its
  round trip is asserted, and that the outputs are unchanged.
- dtype: no loader has a field of its own; transformers' from_pretrained (dtype "auto") and
  ours load the stored dtype, and bf16 weights change the output.
Refusals of configs a format cannot express are tests/test_speculators_format.py's.
The speculators loader's target_layer_ids are its aux_hidden_state_layer_ids minus one: it
indexes HF hidden_states (0 = embedding output) where z-lab and we use "output of layer i"
(convert/dflash/converter.py:117-126).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.io import load_draft, save_msgpack
from tests._speculators_fixtures import (YARN, one_hot_verifier_states, random_params,
                                         run_oracle, tiny_config, write_verifier)
from tools.export_draft import export

pytestmark = pytest.mark.slow  # ~75 s on the shared 2-core box (load ~6), one .venv-ref call

TOL = 1e-4  # ours vs the reference, float32 (as tests/test_model_parity.py)
MIN_CHANGE = 1e-3  # a changed field moves the output by more than this (f32 noise ~1e-6)
T, CTX, POS0 = 48, 40, 3000
ANCHORS = np.array([12, 24, 36])
BASE = dict(sliding_window=8)  # on tiny_config: YaRN, bias, (full, sliding) layers

# variant -> (field it changes, config overrides, export dtype)
VARIANTS = {
    "layer_types": ("layer_types", dict(layer_types=("sliding_attention", "full_attention")),
                    None),
    "sliding_window": ("sliding_window", dict(sliding_window=4), None),
    "rope_theta": ("rope_theta", dict(rope_theta=500000.0), None),
    "rope_scaling_yarn_factor": ("rope_scaling", dict(rope_scaling={**YARN, "factor": 16.0}),
                                 None),
    "rope_scaling_off": ("rope_scaling", dict(rope_scaling=None), None),
    "attention_bias": ("attention_bias", dict(attention_bias=False), None),
    "mask_token_id": ("mask_token_id", dict(mask_token_id=7), None),
    "target_layer_ids": ("target_layer_ids", dict(target_layer_ids=(0, 3, 5)), None),
    "block_size": ("block_size", dict(block_size=4), None),
    "num_target_layers": ("num_target_layers", dict(num_target_layers=12), None),
    "rms_norm_eps": ("rms_norm_eps", dict(rms_norm_eps=0.1), None),
    "dtype": ("dtype", {}, "bfloat16"),
}
NO_FORWARD = {"num_target_layers"}  # see the module docstring
FIELDS = sorted({field for field, _, _ in VARIANTS.values()})
ALL = ["base", *VARIANTS]


def _config(name):
    return tiny_config(**{**BASE, **(VARIANTS[name][1] if name != "base" else {})})


def _exported(config, dtype: str) -> dict:
    """Every listed field as exported, in the reference's conventions (layer i = its output)."""
    return {"layer_types": list(config.layer_types), "sliding_window": config.sliding_window,
            "rope_theta": config.rope_theta,
            "rope_scaling": {k: v for k, v in config.rope_params.items() if k != "rope_theta"},
            "attention_bias": config.attention_bias, "mask_token_id": config.mask_token_id,
            "target_layer_ids": list(config.target_layer_ids), "block_size": config.block_size,
            "num_target_layers": config.num_target_layers, "rms_norm_eps": config.rms_norm_eps,
            "dtype": dtype}


def _subset(params, config):
    """The base draft's params that `config` has (attention_bias=False drops the biases)."""
    def pick(path, _):
        x = params
        for k in path:
            x = x[getattr(k, "key", getattr(k, "idx", None))]
        return x
    return jax.tree_util.tree_map_with_path(pick, model.param_shapes(config),
                                            is_leaf=lambda x: isinstance(x, tuple))


def _our_block(config, params, x) -> np.ndarray:
    """Our loaded draft on one block: [B, H]. Inputs stay float32 whatever the params' dtype:
    the module casts weights to its input's dtype (model/layers.py), so bf16 weights are
    bf16-rounded float32 weights here, as in our harness (pipeline/speculative/draft.py)."""
    # layer id i = output of target layer i = HF hidden_states[i + 1]
    # (pipeline/teacher/easydel_teacher.py), the reference's extract_context_feature
    feats = np.concatenate([x["stack"][i + 1][None, :CTX] for i in config.target_layer_ids], -1)
    tokens = model.block_tokens(config, jnp.asarray(x["input_ids"]), jnp.asarray([[CTX]]))[:, 0]
    noise = model.embed_block(config, jnp.asarray(x["embed"]), tokens)
    pos = jnp.arange(POS0, POS0 + CTX + config.block_size)[None]
    # eager, not jitted: 13 configs would cost a ~2.5 s compile each; op by op is ~0.2 s
    return np.asarray(model.draft_hidden(config, params, jnp.asarray(feats), noise, pos))[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_fields")
    base = _config("base")
    params = random_params(base)
    verifier = write_verifier(tmp / "verifier", base)
    rng = np.random.default_rng(5)
    input_ids = rng.integers(0, 63, size=(1, T)).astype(np.int32)
    x = dict(stack=rng.normal(size=(base.num_target_layers + 1, T, base.hidden_size))
             .astype(np.float32), input_ids=input_ids, loss_mask=np.ones((1, T), np.int32),
             verifier_last=one_hot_verifier_states(verifier["lm_head.weight"], input_ids),
             anchors=ANCHORS, anchor_valid=np.ones(len(ANCHORS), bool),
             embed=verifier["model.embed_tokens.weight"], ctx=CTX, pos0=POS0)
    np.savez(tmp / "inputs.npz", **x)
    ours, jobs, want = {}, [], {}
    for name in ALL:
        config = _config(name)
        dtype = VARIANTS[name][2] if name != "base" else None
        want[name] = _exported(config, dtype or "float32")
        snapshot = save_msgpack(tmp / f"{name}.msgpack", config, _subset(params, config))
        for fmt in ("z-lab", "speculators"):
            out = export(snapshot, tmp / name / fmt, dtype=dtype, fmt=fmt,
                         verifier=str(tmp / "verifier"))
            loaded, p = load_draft(out)
            ours[name, fmt] = (loaded, p, _our_block(loaded, p, x))
        common = dict(inputs=str(tmp / "inputs.npz"), verifier=str(tmp / "verifier"),
                      gammas=[4.0], grad=False)
        jobs += [dict(common, loader="dflash", draft=str(tmp / name / "z-lab"),
                      out=str(tmp / f"{name}.dflash.npz")),
                 dict(common, loader="speculators", draft=str(tmp / name / "speculators"),
                      out=str(tmp / f"{name}.spec.npz"))]
    results = run_oracle(jobs, tmp, script="_export_fields_oracle.py")
    ref = {name: results[2 * i] for i, name in enumerate(ALL)}
    spec = {name: results[2 * i + 1] for i, name in enumerate(ALL)}
    return dict(ours=ours, ref=ref, spec=spec, want=want, params=params)


def _read(out) -> dict:
    return json.loads(str(out["config"]))


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_changes_exactly_its_field(name):
    """The variants are what they claim: one listed field changed, no other config field."""
    field, _, dtype = VARIANTS[name]
    base, other = _exported(_config("base"), "float32"), _exported(_config(name),
                                                                    dtype or "float32")
    assert [f for f in FIELDS if base[f] != other[f]] == [field]
    a, b = dataclasses.asdict(_config("base")), dataclasses.asdict(_config(name))
    assert {k for k in a if a[k] != b[k]} <= {field}


@pytest.mark.parametrize("name", ALL)
def test_every_field_round_trips_in_our_loader(run, name):
    want = run["want"][name]
    for fmt in ("z-lab", "speculators"):
        loaded, params, _ = run["ours"][name, fmt]
        assert loaded == _config(name), fmt
        got = _exported(loaded, str(jax.tree.leaves(params)[0].dtype))
        for field in FIELDS:
            assert got[field] == want[field], (fmt, field)


@pytest.mark.parametrize("name", ALL)
def test_every_field_round_trips_in_reference_dflash(run, name):
    got, want = _read(run["ref"][name]), run["want"][name]
    got["rope_scaling"] = got.pop("rope_parameters")
    for field in FIELDS:
        assert got[field] == want[field], field
    # and each attention module uses them: sliding layers causal and windowed (model.py
    # Qwen3DFlashAttention.__init__, is_causal unset), every norm with the exported eps
    sliding = [t == "sliding_attention" for t in want["layer_types"]]
    assert got["layer_causal"] == sliding
    assert got["layer_windows"] == [want["sliding_window"] if s else None for s in sliding]
    assert got["layer_eps"] == [want["rms_norm_eps"]] * len(sliding)


@pytest.mark.parametrize("name", ALL)
def test_every_field_round_trips_in_speculators(run, name):
    got, want = _read(run["spec"][name]), run["want"][name]
    got["rope_scaling"] = got.pop("rope_parameters")
    # its layer ids index HF hidden_states (converter.py:117-126): ours + 1
    got["target_layer_ids"] = [i - 1 for i in got.pop("aux_hidden_state_layer_ids")]
    for field in FIELDS:
        assert got[field] == want[field], field
    assert got["sliding_window_non_causal"] is False  # sliding layers causal, as exported


# ------------------------------------------------------------------ each field reaches the output


def _changed(base: np.ndarray, other: np.ndarray) -> float:
    """Max |difference| over the slots both blocks have (block_size changes the block)."""
    n = min(base.shape[-2], other.shape[-2])
    return float(np.abs(base[..., :n, :] - other[..., :n, :]).max())


def _spec_blocks(out, block_size: int) -> np.ndarray:
    return out["hidden"].reshape(len(ANCHORS), block_size, -1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_field_changes_our_output(run, name):
    for fmt in ("z-lab", "speculators"):
        change = _changed(run["ours"]["base", fmt][2], run["ours"][name, fmt][2])
        if name in NO_FORWARD:
            assert change == 0.0, fmt
        else:
            assert change > MIN_CHANGE, fmt


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_field_changes_reference_output(run, name):
    change = _changed(run["ref"]["base"]["hidden"], run["ref"][name]["hidden"])
    if name in NO_FORWARD:
        assert change == 0.0
    else:
        assert change > MIN_CHANGE


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_field_changes_speculators_output(run, name):
    base = _spec_blocks(run["spec"]["base"], _config("base").block_size)
    other = _spec_blocks(run["spec"][name], _config(name).block_size)
    if name in NO_FORWARD:
        assert _changed(base, other) == 0.0
    else:
        assert _changed(base, other) > MIN_CHANGE


@pytest.mark.parametrize("name", ["base", *sorted(n for n in VARIANTS if n != "dtype")])
def test_reference_output_equals_ours(run, name):
    """Float32 variants: the reference, reading the z-lab export its own way, computes what we
    compute (so each field means the same in both, not merely something)."""
    got = run["ours"][name, "z-lab"][2]
    want = run["ref"][name]["hidden"][0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL
