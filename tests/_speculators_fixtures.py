"""Helpers for the speculators-format tests: a tiny draft, a tiny verifier directory (what
speculators reads the embedding, LM head and final norm from), inputs, and the call into
.venv-ref where `speculators` is installed (tests/_speculators_oracle.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import model
from model.config import DraftConfig

ROOT = Path(__file__).resolve().parents[1]
REF_PY = ROOT / ".venv-ref" / "bin" / "python"
MARGIN = 1000.0
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0}


def tiny_config(**overrides) -> DraftConfig:
    """vocab = hidden = 64 so that the verifier head is square (invertible: one-hot targets)."""
    base = dict(vocab_size=64, mask_token_id=63, attention_bias=True, rope_scaling=YARN,
                layer_types=("full_attention", "sliding_attention"), sliding_window=64,
                target_layer_ids=(1, 3, 5), num_target_layers=8)
    base.update(overrides)
    return DraftConfig.tiny(**base)


def random_params(config: DraftConfig, seed: int = 0) -> dict:
    """Draft params away from init: norms ~1 +- 0.1, biases ~0.05, kernels ~N(0, 0.02)."""
    params = model.init_draft_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        kind = path[-1].key
        noise = rng.normal(size=x.shape).astype(np.float32)
        out.append(x if kind == "kernel" else jnp.asarray(
            (1.0 + 0.1 * noise) if kind == "scale" else 0.05 * noise))
    return jax.tree_util.tree_unflatten(treedef, out)


def write_verifier(path: Path, config: DraftConfig, seed: int = 1) -> dict:
    """A verifier directory speculators loads its frozen tensors from: config.json (Qwen3, the
    target's depth) and model.safetensors (embedding, LM head, final norm). -> the arrays."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, v = config.hidden_size, config.vocab_size
    arrays = {"model.embed_tokens.weight": rng.normal(size=(v, h)).astype(np.float32),
              "lm_head.weight": (rng.normal(size=(v, h)) / np.sqrt(h)).astype(np.float32),
              }
    # Final-norm scale so that one_hot_verifier_states gives label logits >= MARGIN.
    rms = np.sqrt((np.linalg.inv(arrays["lm_head.weight"].astype(np.float64)) ** 2).mean(0))
    arrays["model.norm.weight"] = np.full((h,), MARGIN * rms.max(), np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": h,
        "num_hidden_layers": config.num_target_layers, "vocab_size": v,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size}))
    return arrays


def one_hot_verifier_states(lm_head: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """verifier_last [1, T, H] whose verifier logits at t (RMSNorm with write_verifier's scale,
    then the head) are one-hot at input_ids[t + 1] with a margin >= MARGIN: speculators'
    distillation targets then equal the hard labels our trainer uses, exactly in f32
    (softmax's exp(-MARGIN) underflows to 0)."""
    nxt = np.concatenate([input_ids[0, 1:], input_ids[0, -1:]])
    v = np.linalg.solve(lm_head.astype(np.float64), np.eye(lm_head.shape[0])[nxt].T).T  # [T, H]
    return v.astype(np.float32)[None]


def run_oracle(jobs: list[dict], workdir: Path,
               script: str = "_speculators_oracle.py") -> list[dict]:
    """Run the jobs in .venv-ref with tests/<script>; -> each job's npz as a dict."""
    assert REF_PY.exists(), "reference env missing: run `make ref-venv` (creates .venv-ref)"
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    res = subprocess.run([str(REF_PY), str(ROOT / "tests" / script), str(spec)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return [dict(np.load(j["out"])) for j in jobs]


def case_frozen(case) -> dict:
    """The frozen embedding and LM head of a parity case's verifier, as the draft step takes them."""
    v = case["verifier"]
    return {"embed": jnp.asarray(v["model.embed_tokens.weight"]),
            "lm_head": jnp.asarray(v["lm_head.weight"])}


def case_batch(case) -> dict:
    """A parity case's inputs and anchors as the draft step's batch."""
    x = case["inputs"]
    return {"input_ids": jnp.asarray(x["input_ids"]), "loss_mask": jnp.asarray(x["loss_mask"]),
            "features": jnp.asarray(x["features"]), "anchors": jnp.asarray(case["anchors"]),
            "anchor_valid": jnp.asarray(case["valid"])}
