"""Issue 23: drafts exported by `tools.export_draft` as vLLM TPU (`tpu-inference` 0.32.0) reads
and runs them, checked with its own code in .venv-tpuinf (tests/_tpu_inference_oracle.py: its
registry's DFlashForCausalLM, its weight loader, its proposer's block, its attention dispatcher
with the package's XLA reference kernel on CPU).

The config fields tpu-inference reads, and where (paths in the tpu_inference package):
- target layer ids: dflash_config.target_layer_ids (models/jax/qwen3.py
  get_dflash_aux_hidden_state_layers), each the OUTPUT of target layer i (its JAX targets
  append x after running layer i: HF hidden_states[i + 1], the same offset as ours and z-lab);
  their count sizes fc (models/jax/dflash.py DFlashModel). -> test_fields, test_fusion.
- mask token: dflash_config.mask_token_id, default 0 (spec_decode/jax/dflash.py
  DFlashProposer.__init__). -> test_fields (the block it builds).
- block size: TOP-LEVEL `block_size`, else num_speculative_tokens + 1 (same place). Our z-lab
  config had it only inside dflash_config, so a server started with fewer speculative tokens
  than block_size - 1 ran a shorter block than the one trained; the export now writes it at
  the top level too. The oracle runs with 3 speculative tokens to check it.
- head_dim and its padding: `head_dim`, padded to a multiple of 128 unless it is 64
  (utils.get_padded_head_dim); the loader pads q/k/v/o but q_norm/k_norm are not padded, so
  any other head_dim fails to run; 64 takes the hd64 kernel, which refuses the bidirectional
  attention DFlash needs (layers/common/attention_interface.py). -> test_refusals.
- attention bias: not modelled: the loader has no place for `*_proj.bias` and raises.
- sliding window / layer_types: never read; every layer runs full bidirectional attention over
  the context and the block. -> test_sliding_window_is_not_applied.
- rope: DFlashModel takes rope_theta and rope_scaling from the TARGET's config via getattr; with
  transformers >= 5 (which it requires) configs have no `rope_theta` attribute, so theta is its
  fallback 1e6, and `rope_scaling` is transformers' rope_parameters dict, which apply_rope
  treats as Llama-3 scaling (factor 8 by default) whatever its rope_type. So no export can set
  the RoPE it runs. -> test_rope_is_not_the_exported_one; the block parity below is therefore
  taken at position 0 everywhere (RoPE the identity), where everything else must agree.
"""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.config import DraftConfig
from model.draft import _apply
from model.engine_support import tpu_inference_findings
from model.io import load_config, save_msgpack
from tests._speculators_fixtures import random_params
from tests._tpu_inference_fixtures import run_tpu_inference
from tools.export_draft import export

pytestmark = pytest.mark.slow

TOL = 1e-4
MIN_CHANGE = 1e-3
T, CTX, NUM_SPEC = 24, 20, 3
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
# tiny: the smallest draft tpu-inference's DFlash runs (head_dim 128, no bias, full layers)
TINY = DraftConfig.tiny(vocab_size=64, mask_token_id=63, head_dim=128)
# held out: a GPT-OSS target's shapes scaled down (24 target layers, ids [1, 6, 11, 16, 21],
# 8:1 GQA, head_dim 64, attention bias, YaRN 32 / 4096, theta 150000)
GPT_OSS = DraftConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=64, vocab_size=64,
                      block_size=8, mask_token_id=63, target_layer_ids=(1, 6, 11, 16, 21),
                      num_target_layers=24, rope_theta=150000.0, rope_scaling=GPT_OSS_YARN,
                      attention_bias=True, max_position_embeddings=131072)
CONFIGS = {
    "tiny": TINY,
    "tiny_sliding": dataclasses.replace(
        TINY, layer_types=("full_attention", "sliding_attention"), sliding_window=4),
    "tiny_head_dim_16": dataclasses.replace(TINY, head_dim=16),
    "gpt_oss": GPT_OSS,
    "gpt_oss_no_bias": dataclasses.replace(GPT_OSS, attention_bias=False),
}


def _target_config(config: DraftConfig, name: str) -> dict:
    """The target's config.json as the engine reads it (GPT-OSS for the held-out drafts)."""
    d = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_target_layers,
         "num_attention_heads": config.num_attention_heads,
         "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
         "vocab_size": config.vocab_size, "intermediate_size": 128}
    if name.startswith("gpt_oss"):
        return dict(d, model_type="gpt_oss", architectures=["GptOssForCausalLM"],
                    num_local_experts=4, rope_theta=150000.0, rope_scaling=GPT_OSS_YARN)
    return dict(d, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                rope_theta=config.rope_theta)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tpu_inference")
    rng = np.random.default_rng(3)
    jobs, ours = [], {}
    for name, config in CONFIGS.items():
        params = random_params(config)
        out = export(save_msgpack(tmp / f"{name}.msgpack", config, params), tmp / name)
        (tmp / f"{name}.target.json").write_text(json.dumps(_target_config(config, name)))
        h, v = config.hidden_size, config.vocab_size
        x = dict(stack=rng.normal(size=(config.num_target_layers + 1, T, h)).astype(np.float32),
                 input_ids=rng.integers(0, v - 1, size=T).astype(np.int32),
                 embed=rng.normal(size=(v, h)).astype(np.float32),
                 lm_head=(rng.normal(size=(v, h)) / np.sqrt(h)).astype(np.float32), ctx=CTX)
        np.savez(tmp / f"{name}.inputs.npz", **x)
        # ours is the draft as trained (not as read back): an export that loses or shifts a
        # field shows up as a difference
        ours[name] = (config, params, x, load_config(out))
        jobs.append(dict(draft=str(out), target=str(tmp / f"{name}.target.json"),
                         inputs=str(tmp / f"{name}.inputs.npz"), num_speculative_tokens=NUM_SPEC,
                         zero_positions=True, out=str(tmp / f"{name}.out.npz")))
    # the tiny draft once more at its real positions (CTX.. for the block), RoPE included
    jobs.append(dict(jobs[0], zero_positions=False, out=str(tmp / "tiny_positions.out.npz")))
    results = run_tpu_inference(jobs, tmp)
    runs = {name: (ours[name], res) for name, res in zip(CONFIGS, results)}
    runs["tiny_positions"] = (ours["tiny"], results[-1])
    return runs


def _read(res) -> dict:
    return json.loads(str(res["config"]))


def _features(config, x) -> np.ndarray:
    # ours: layer id i = output of target layer i = HF hidden_states[i + 1]
    return np.concatenate([x["stack"][i + 1][:CTX] for i in config.target_layer_ids], -1)


def _our_block(config, params, x, window: bool = True):
    """Our draft on the block tpu-inference runs, all positions 0; -> (hidden [B, H], logits)."""
    if not window:
        config = dataclasses.replace(config, layer_types=(), sliding_window=None)
    tokens = model.block_tokens(config, jnp.asarray(x["input_ids"])[None], jnp.asarray([[CTX]]))
    noise = model.embed_block(config, jnp.asarray(x["embed"]), tokens[:, 0])
    # its DFlashModel builds embed_tokens with dtype bfloat16 (hard-coded), so the block enters
    # its first layer rounded to bf16 even with f32 weights; everything after runs in f32 here
    noise = noise.astype(jnp.bfloat16).astype(jnp.float32)
    pos = jnp.zeros((1, CTX + config.block_size), jnp.int32)
    hidden = model.draft_hidden(config, params, jnp.asarray(_features(config, x))[None], noise, pos)
    logits = model.draft_logits(config, hidden, jnp.asarray(x["lm_head"]))
    return np.asarray(hidden)[0], np.asarray(logits)[0]


@pytest.mark.parametrize("name", ["tiny", "tiny_sliding", "gpt_oss_no_bias"])
def test_tpu_inference_reads_our_fields(run, name):
    (config, _, x, _), res = run[name]
    got = _read(res)
    assert got["target_layer_ids"] == list(config.target_layer_ids)
    assert got["fc_in"] == config.num_features * config.hidden_size
    assert got["mask_token_id"] == config.mask_token_id
    assert got["block_size"] == config.block_size  # not NUM_SPEC + 1: the top-level field
    assert got["block_tokens"] == [int(x["input_ids"][CTX])] + [config.mask_token_id] * (
        config.block_size - 1)
    assert got["block_positions"] == list(range(CTX, CTX + config.block_size))
    assert got["head_dim_original"] == config.head_dim


@pytest.mark.parametrize("name", ["tiny", "tiny_sliding", "gpt_oss_no_bias"])
def test_tpu_inference_fusion_equals_ours(run, name):
    """fc + hidden_norm over the layers it taps equal ours over the layers we trained on."""
    (config, params, x, _), res = run[name]
    ours = _apply(config, params, jnp.asarray(_features(config, x)), method="fuse")
    assert np.abs(res["target_hidden"] - np.asarray(ours)).max() <= TOL


def test_tpu_inference_block_equals_ours(run):
    """Tiny draft, RoPE the identity: its hidden states and logits for the block equal ours."""
    (config, params, x, _), res = run["tiny"]
    assert "error" not in _read(res)
    hidden, logits = _our_block(config, params, x)
    assert res["hidden"].shape == hidden.shape
    assert np.abs(res["hidden"] - hidden).max() <= TOL
    assert np.abs(res["logits"] - logits).max() <= TOL


def test_tpu_inference_sliding_window_is_not_applied(run):
    """A draft with a sliding layer (window 4 < 20 context positions) runs in tpu-inference as
    if the window were not there: its output equals ours with the window dropped, and differs
    from the draft as trained. So the export must keep the window (the reference loaders read
    it) and a user must know that this engine ignores it."""
    (config, params, x, _), res = run["tiny_sliding"]
    assert config.sliding_window == 4 and "sliding_attention" in config.layer_types
    trained, _ = _our_block(config, params, x)
    without, _ = _our_block(config, params, x, window=False)
    assert np.abs(res["hidden"] - without).max() <= TOL
    assert np.abs(res["hidden"] - trained).max() > MIN_CHANGE


def test_tpu_inference_refusals(run):
    """Drafts tpu-inference 0.32.0 cannot run, as its own code says."""
    assert "reshape" in _read(run["tiny_head_dim_16"][1])["error"]  # q_norm not padded to 128
    assert "not a valid param path" in _read(run["gpt_oss"][1])["error"]  # q_proj.bias
    assert "Bidirectional attention is not supported on the head_dim==64" in _read(
        run["gpt_oss_no_bias"][1])["error"]


def test_tpu_inference_gpt_oss_target_has_no_dflash_path(run):
    """The engine side, by its own resolution: DFlashDraftModel -> its JAX DFlashForCausalLM
    ("flax_nnx"); a GPT-OSS target is served by vLLM's torch model ("vllm", its preferred
    list), and DFlashProposer.load_model refuses a draft whose implementation differs from the
    target's; forcing the target to its JAX GptOss gives a model that collects no DFlash
    features (only its Qwen3 / Llama-3 JAX models do). So gpt-oss-20b + DFlash does not start
    on tpu-inference 0.32.0, whatever the draft."""
    qwen3, gpt_oss = _read(run["tiny"][1]), _read(run["gpt_oss_no_bias"][1])
    assert qwen3["draft_class"] == gpt_oss["draft_class"] == "DFlashForCausalLM"
    assert qwen3["impl"] == {"target": "flax_nnx", "draft": "flax_nnx"}
    assert qwen3["target_jax_taps_dflash"] is True
    assert gpt_oss["impl"] == {"target": "vllm", "draft": "flax_nnx"}
    assert gpt_oss["target_jax_taps_dflash"] is False


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tpu_inference_findings_match_its_behaviour(run, name):
    """model.engine_support's list, computed from the EXPORTED config (what the engine sees),
    says what tpu-inference did: blocked exactly when it refused, and a sliding-window
    finding exactly for the sliding draft, so an export that drops the window is caught."""
    (config, _, _, exported), res = run[name]
    blocking, divergent = tpu_inference_findings(exported)
    assert bool(blocking) == ("error" in _read(res))
    # the window as trained, so an export that drops it (or the layer type) is caught
    window = f"layers [1] slide over {config.sliding_window} positions"
    assert any(window in d for d in divergent) == (name == "tiny_sliding")
    assert any(f"not theta {config.rope_theta:g}" in d for d in divergent)


@pytest.mark.parametrize("name", ["tiny", "gpt_oss_no_bias"])
def test_tpu_inference_rope_is_not_the_exported_one(run, name):
    (config, _, _, _), res = run[name]
    got = _read(res)
    assert got["rope_theta"] == 1e6 != config.rope_theta
    assert got["rope_scaling"]["rope_theta"] == config.rope_theta  # present, but as scaling


def test_tpu_inference_rope_moves_its_block(run):
    """At the block's real positions its output leaves ours, while at position 0 (RoPE the
    identity, test_tpu_inference_block_equals_ours) it equals ours: the RoPE it runs is not
    the trained one."""
    (config, params, x, _), res = run["tiny_positions"]
    assert "error" not in _read(res)
    tokens = model.block_tokens(config, jnp.asarray(x["input_ids"])[None], jnp.asarray([[CTX]]))
    noise = model.embed_block(config, jnp.asarray(x["embed"]), tokens[:, 0])
    noise = noise.astype(jnp.bfloat16).astype(jnp.float32)
    pos = jnp.arange(CTX + config.block_size)[None]
    ours = model.draft_hidden(config, params, jnp.asarray(_features(config, x))[None], noise, pos)
    assert np.abs(res["hidden"] - np.asarray(ours)[0]).max() > MIN_CHANGE


def test_tpu_inference_stand_ins_are_only_the_documented_ones(run):
    stood_in = _read(run["tiny"][1])["stood_in"]
    assert {m.split(".")[0] for m in stood_in["modules"]} <= {
        "vllm", "compressed_tensors", "tokamax", "qwix"}
    assert set(stood_in["torch_ops"]) <= {"aten::prod.dim_Dimname", "aten::index_copy.dimname",
                                          "torchax.default_env", "vllm::torch_sdpa_wrapper"}


def test_export_engine_check_refuses_and_warns(tmp_path, capsys):
    """`tools.export_draft --engine tpu-inference`: a draft it cannot run is refused in one
    line with nothing written; one it runs differently is written, with the warnings."""
    from tools.export_draft import main

    for name, config in (("gpt_oss", GPT_OSS), ("tiny_sliding", CONFIGS["tiny_sliding"])):
        save_msgpack(tmp_path / f"{name}.msgpack", config, random_params(config))
    assert main([str(tmp_path / "gpt_oss.msgpack"), str(tmp_path / "a"),
                 "--engine", "tpu-inference"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tpu-inference 0.32.0 cannot run this draft: head_dim 64")
    assert "attention biases" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    assert main([str(tmp_path / "tiny_sliding.msgpack"), str(tmp_path / "b"),
                 "--engine", "tpu-inference"]) == 0
    err = capsys.readouterr().err
    assert "warning: tpu-inference 0.32.0: layers [1] slide over 4 positions" in err
    assert load_config(tmp_path / "b") == CONFIGS["tiny_sliding"]
