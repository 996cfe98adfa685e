"""Shared oracle for the teacher tests: a small random-weight HF torch GptOssForCausalLM.

Built once per test process (functools.cache) and saved with save_pretrained (safetensors) so
the teacher loads it exactly like a real snapshot. It has every GPT-OSS feature the fixes touch:
sliding and full layers (window 8, sequences of 24), 4 experts with top-2 routing, attention
sinks, biases, and YaRN RoPE with `truncate: false` as gpt-oss ships it. Weights are drawn wider
than HF's init (std 0.1, sinks std 1) so routing, sinks and RoPE all matter to the output.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
HIDDEN = 64
SEQ_LEN = 24  # > sliding_window (8): positions past the window are compared
VALID_ROW1 = 18  # row 1 is right-padded after 18 tokens


@functools.cache
def tiny_model_dir(num_local_experts: int = 4) -> Path:
    """A saved HF GPT-OSS snapshot (config.json + model.safetensors), float32. 8 experts:
    the same model with experts that divide over the 8 simulated devices (tests of the
    expert-sharded mesh)."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES, sliding_window=8,
        num_local_experts=num_local_experts, num_experts_per_tok=2, vocab_size=128, hidden_size=HIDDEN,
        intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 128,
                         "rope_theta": 150000.0})
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sinks" in name:
                p.normal_(0.0, 1.0)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    out = Path(tempfile.mkdtemp(prefix="dflash-teacher-test-"))
    atexit.register(shutil.rmtree, out, True)
    model.save_pretrained(out)
    return out


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [2, 24], attention_mask int32 [2, 24]); row 1 right-padded."""
    ids = np.random.default_rng(0).integers(0, 128, size=(2, SEQ_LEN)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, VALID_ROW1:] = 0
    return ids, mask


@functools.cache
def hf_reference(dtype: str = "float32") -> dict:
    """HF torch outputs on inputs(): hidden_states (L+1 arrays [2, T, H]) and logits [2, T, V]."""
    return hf_outputs(tiny_model_dir(), *inputs(), dtype)


def hf_outputs(model_dir, ids, mask, dtype: str = "float32") -> dict:
    """HF torch outputs of the snapshot in model_dir on (ids, mask) [b, T]."""
    import torch
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask), output_hidden_states=True)
    return {"hidden_states": [h.float().numpy() for h in out.hidden_states],
            "logits": out.logits.float().numpy()}


def max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| over the valid (unpadded) positions of inputs()."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    _, mask = inputs()
    valid = mask.astype(bool)
    return float(np.max(np.abs(got - ref)[valid]) / np.max(np.abs(ref[valid])))


def errors(features, logits, layer_ids, reference=None) -> dict:
    """Per-layer and logits relative errors of teacher outputs against HF (float32 by default)."""
    ref = reference or hf_reference()
    feats = np.asarray(features, np.float32)
    out = {f"layer{i}": max_rel_err(feats[..., k * HIDDEN:(k + 1) * HIDDEN],
                                    ref["hidden_states"][i + 1])
           for k, i in enumerate(layer_ids)}
    if logits is not None:
        out["logits"] = max_rel_err(logits, ref["logits"])
    return out


# A script run in a fresh 1-device process (the mesh always spans every device present).
ONE_DEVICE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
from pipeline.teacher.easydel_teacher import Teacher
assert len(jax.devices()) == 1, jax.devices()
t = Teacher.from_pretrained(sys.argv[1], dtype=jnp.float32, compilation_cache="off")
data = np.load(sys.argv[2])
logits, feats = t.forward(data["ids"], data["mask"], [0, 1, 2, 3], logits="all")
np.savez(sys.argv[3], features=np.asarray(feats), logits=np.asarray(logits))
"""


@functools.cache
def f32_teacher():
    """The float32 teacher with all fixes on the 8 simulated devices (default mesh shape)."""
    import jax.numpy as jnp

    from pipeline.teacher.easydel_teacher import Teacher

    return Teacher.from_pretrained(str(tiny_model_dir()), dtype=jnp.float32,
                                   compilation_cache="off")
