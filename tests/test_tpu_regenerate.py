"""`tools.tpu_compile --program regenerate` on a real TPU topology (v5e:2x2, libtpu in .venv-tpu,
in a subprocess as tests/test_tpu_compile.py does): the decode step and the prefill chunk of the
tiny teacher's decoder compile, and the per-chip arguments XLA reports are exactly the shards of
the weights and of the KV cache computed here from the shapes, up to XLA's per-buffer rounding
(so the weights are split over "model" and the cache over data x model, not replicated)."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_tpu_compile import ROOT, TPU_PY, _tpu_env


@pytest.mark.slow
def test_tiny_regenerate_compiles_with_sharded_weights_and_cache():
    assert TPU_PY.exists(), ".venv-tpu is missing: `make tpu-venv` (make test builds it)"
    cmd = [str(TPU_PY), "-m", "tools.tpu_compile", "--program", "regenerate", "--teacher", "tiny",
           "--topology", "v5e:2x2", "--batch-size", "8", "--cache-len", "256"]
    r = subprocess.run(cmd, cwd=ROOT, env=_tpu_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "fits (margin" in r.stdout and "tokens/s" in r.stdout

    from pipeline.teacher.tiny_recipe import TinyTeacherConfig

    t = TinyTeacherConfig()
    assert row["mesh"] == {"data": 2, "model": 2}  # 4 chips, 2 KV heads: model = 2
    h, hd, e, i = t.hidden_size, t.head_dim, t.num_local_experts, t.intermediate_size
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    per_layer_big = (2 * q * h + 2 * kv * h + 3 * e * h * i) * 2 // 2  # bf16, split over model
    per_layer_f32 = ((q + 2 * kv + t.num_attention_heads + 2 * e * i) // 2
                     + 3 * h + e * h + e + e * h) * 4  # split: biases/sinks/gate_up_b; whole: rest
    weights = (t.num_hidden_layers * (per_layer_big + per_layer_f32)
               + 2 * t.vocab_size * h * 2 // 2 + h * 4 + hd // 2 * 4 + 4)
    cache = t.num_hidden_layers * 2 * (8 // 2) * (t.num_key_value_heads // 2) * hd * 256 * 2
    decode = row["decode"]["memory"]
    assert decode["fits"] and row["prefill"]["memory"]["fits"]
    tokens = (8 // 2) * 4 + 4 + 4 + (8 // 2) * 4 + (8 // 2) * 2 * 4  # tok, t, slot, first, keys
    # XLA:TPU rounds each buffer up (small ones to 512 B): allow that per argument array, far
    # below what one replicated weight would add (the embedding alone: 1 MiB)
    buffers = 5 + 19 * t.num_hidden_layers + 5  # top-level params, layer params + caches, inputs
    assert 0 <= decode["arguments"] - (weights + cache + tokens) <= 512 * buffers
    assert decode["alias"] >= cache  # the donated cache is updated in place
    assert row["roofline"]["tokens_per_s"] > 0
